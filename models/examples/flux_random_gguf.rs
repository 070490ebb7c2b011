//! Writes random-weight GGUF files with the real sizes of the quantized models the worker runs, for
//! memory and speed benchmarks where the real weights cannot be downloaded.
//!
//! ```text
//! flux_random_gguf flux OUT.gguf [--seed N] [--threads N] [--double N] [--single N]
//! flux_random_gguf t5   OUT.gguf [--seed N] [--threads N] [--layers N]
//! flux_random_gguf check-flux FIXTURE.gguf
//! ```
//!
//! - `flux`: a FLUX.1-Fill-dev transformer (11.9 B parameters) in the city96 layout the worker's
//!   GGUF loader reads: BFL tensor names (`img_in`, `time_in`/`vector_in`/`guidance_in` MLPs,
//!   `txt_in`, 19 `double_blocks`, 38 `single_blocks`, `final_layer`), the tensor types of a
//!   city96 `Q5_K_S` file: 1-D tensors and `img_in`, `time_in.in_layer`, `vector_in.in_layer`,
//!   `guidance_in.in_layer`, `final_layer.linear` in F32, every other 2-D weight in Q5_K (F16
//!   where a row is not a multiple of 256, which does not happen at full size).
//! - `t5`: a T5-XXL encoder (4.8 B parameters: 24 blocks, d_model 4096, 64 heads × 64, gated-gelu
//!   d_ff 10240, vocabulary 32128, relative attention bias in block 0) with llama.cpp names
//!   (`token_embd`, `enc.blk.N.attn_q` …, `enc.output_norm`) and the types of llama.cpp's
//!   `Q5_K_M`: Q5_K, with Q6_K for `attn_v` and `ffn_down` of the layers llama.cpp gives more
//!   bits (the first and last eighth, and every third in between); norms and the bias F32.
//! - `check-flux`: builds the `flux` plan with the dimensions of the tiny test fixture
//!   (`tests/fixtures/flux/gguf/flux1-fill-dev-Q5_K.gguf`) and compares names, shapes and
//!   types with that file, so the full-size plan follows the fixture's naming and type rules.
//!
//! Values are seeded uniform noise with the standard deviation of `flux_gpu_pipeline.py`'s
//! initialisation: `1/sqrt(fan_in)` for 2-D weights, `1 ± 0.1` for norm scales, `0.05` for
//! biases, so activations stay finite in f16. Tensors are generated and quantized (candle's
//! quantizer) in parallel over `--threads` (default: all cores); the file is written at the end,
//! so memory use is about the size of the output plus one f32 tensor per thread.
//! `--double`/`--single`/`--layers` shrink the stacks (quick local runs).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{Device, Tensor};

/// What values a tensor gets.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Init {
    /// Uniform with standard deviation `1/sqrt(last dim)`.
    Weight,
    /// `1 + 0.1·u` (norm scales).
    Scale,
    /// Standard deviation 0.05 (biases, the T5 relative attention bias).
    Bias,
}

#[derive(Debug, Clone)]
struct Spec {
    name: String,
    /// candle order: `[rows (out), cols (in)]` for linear weights.
    shape: Vec<usize>,
    dtype: GgmlDType,
    init: Init,
}

/// FLUX transformer dimensions.
struct FluxDims {
    hidden: usize,
    heads: usize,
    mlp: usize,
    double: usize,
    single: usize,
    in_channels: usize,
    out_channels: usize,
    pooled: usize,
    context: usize,
    time: usize,
}

impl FluxDims {
    fn fill_dev() -> Self {
        Self {
            hidden: 3072,
            heads: 24,
            mlp: 12288,
            double: 19,
            single: 38,
            in_channels: 384,
            out_channels: 64,
            pooled: 768,
            context: 4096,
            time: 256,
        }
    }

    /// `tests/fixtures/flux/pipeline/transformer/config.json`.
    fn fixture() -> Self {
        Self {
            hidden: 64,
            heads: 2,
            mlp: 256,
            double: 2,
            single: 2,
            in_channels: 384,
            out_channels: 64,
            pooled: 32,
            context: 64,
            time: 256,
        }
    }
}

/// city96 `convert.py` + `lcpp.patch`: these stay F32.
const FLUX_KEEP_F32: &[&str] = &[
    "img_in.",
    "time_in.in_layer.",
    "vector_in.in_layer.",
    "guidance_in.in_layer.",
    "final_layer.linear.",
];

fn flux_type(name: &str, shape: &[usize], q: GgmlDType) -> GgmlDType {
    if shape.len() == 1 || FLUX_KEEP_F32.iter().any(|p| name.starts_with(p)) {
        GgmlDType::F32
    } else if shape[shape.len() - 1].is_multiple_of(q.block_size()) {
        q
    } else {
        GgmlDType::F16
    }
}

fn flux_plan(d: &FluxDims, q: GgmlDType) -> Vec<Spec> {
    let h = d.hidden;
    let hd = h / d.heads;
    let mut out: Vec<(String, Vec<usize>, Init)> = Vec::new();
    let mut linear = |name: String, rows: usize, cols: usize| {
        out.push((format!("{name}.weight"), vec![rows, cols], Init::Weight));
        out.push((format!("{name}.bias"), vec![rows], Init::Bias));
    };
    linear("img_in".into(), h, d.in_channels);
    for (m, inp) in [
        ("time_in", d.time),
        ("vector_in", d.pooled),
        ("guidance_in", d.time),
    ] {
        linear(format!("{m}.in_layer"), h, inp);
        linear(format!("{m}.out_layer"), h, h);
    }
    linear("txt_in".into(), h, d.context);
    for i in 0..d.double {
        for s in ["img", "txt"] {
            let p = format!("double_blocks.{i}.{s}");
            linear(format!("{p}_mod.lin"), 6 * h, h);
            linear(format!("{p}_attn.qkv"), 3 * h, h);
            linear(format!("{p}_attn.proj"), h, h);
            linear(format!("{p}_mlp.0"), d.mlp, h);
            linear(format!("{p}_mlp.2"), h, d.mlp);
        }
    }
    for i in 0..d.single {
        let p = format!("single_blocks.{i}");
        linear(format!("{p}.linear1"), 3 * h + d.mlp, h);
        linear(format!("{p}.linear2"), h, h + d.mlp);
        linear(format!("{p}.modulation.lin"), 3 * h, h);
    }
    linear("final_layer.adaLN_modulation.1".into(), 2 * h, h);
    linear("final_layer.linear".into(), d.out_channels, h);
    for i in 0..d.double {
        for s in ["img", "txt"] {
            for n in ["query_norm", "key_norm"] {
                out.push((
                    format!("double_blocks.{i}.{s}_attn.norm.{n}.scale"),
                    vec![hd],
                    Init::Scale,
                ));
            }
        }
    }
    for i in 0..d.single {
        for n in ["query_norm", "key_norm"] {
            out.push((
                format!("single_blocks.{i}.norm.{n}.scale"),
                vec![hd],
                Init::Scale,
            ));
        }
    }
    out.into_iter()
        .map(|(name, shape, init)| Spec {
            dtype: flux_type(&name, &shape, q),
            name,
            shape,
            init,
        })
        .collect()
}

/// llama.cpp `use_more_bits`: the layers `Q*_K_M` gives `attn_v` and `ffn_down` more bits.
fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

fn t5_plan(layers: usize) -> Vec<Spec> {
    let (dm, inner, ff, vocab, heads, buckets) = (4096, 64 * 64, 10240, 32128, 64, 32);
    let q = GgmlDType::Q5K;
    let mut out = vec![Spec {
        name: "token_embd.weight".into(),
        shape: vec![vocab, dm],
        dtype: q,
        init: Init::Weight,
    }];
    let mut push = |name: String, shape: Vec<usize>, dtype: GgmlDType, init: Init| {
        out.push(Spec {
            name,
            shape,
            dtype,
            init,
        })
    };
    for i in 0..layers {
        let p = format!("enc.blk.{i}");
        let more = if use_more_bits(i, layers) {
            GgmlDType::Q6K
        } else {
            q
        };
        push(
            format!("{p}.attn_norm.weight"),
            vec![dm],
            GgmlDType::F32,
            Init::Scale,
        );
        push(
            format!("{p}.attn_q.weight"),
            vec![inner, dm],
            q,
            Init::Weight,
        );
        push(
            format!("{p}.attn_k.weight"),
            vec![inner, dm],
            q,
            Init::Weight,
        );
        push(
            format!("{p}.attn_v.weight"),
            vec![inner, dm],
            more,
            Init::Weight,
        );
        push(
            format!("{p}.attn_o.weight"),
            vec![dm, inner],
            q,
            Init::Weight,
        );
        if i == 0 {
            push(
                format!("{p}.attn_rel_b.weight"),
                vec![buckets, heads],
                GgmlDType::F32,
                Init::Bias,
            );
        }
        push(
            format!("{p}.ffn_norm.weight"),
            vec![dm],
            GgmlDType::F32,
            Init::Scale,
        );
        push(
            format!("{p}.ffn_gate.weight"),
            vec![ff, dm],
            q,
            Init::Weight,
        );
        push(format!("{p}.ffn_up.weight"), vec![ff, dm], q, Init::Weight);
        push(
            format!("{p}.ffn_down.weight"),
            vec![dm, ff],
            more,
            Init::Weight,
        );
    }
    push(
        "enc.output_norm.weight".into(),
        vec![dm],
        GgmlDType::F32,
        Init::Scale,
    );
    out
}

/// SplitMix64 seeded from the tensor name (FNV-1a) and the run seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64, name: &str) -> Self {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for b in name.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
        Self(h ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Uniform values of mean `mean` and standard deviation `std`.
fn uniform(n: usize, mean: f32, std: f32, rng: &mut Rng) -> Vec<f32> {
    // U(-1, 1) has standard deviation 1/sqrt(3).
    let a = std * 3f32.sqrt();
    let scale = 2.0 * a / (1u32 << 24) as f32;
    let mut v = Vec::with_capacity(n + 1);
    while v.len() < n {
        let r = rng.next();
        v.push(mean - a + (r >> 40) as f32 * scale);
        v.push(mean - a + ((r >> 8) & 0xff_ffff) as f32 * scale);
    }
    v.truncate(n);
    v
}

fn make_tensor(spec: &Spec, seed: u64) -> Result<QTensor> {
    let n: usize = spec.shape.iter().product();
    let mut rng = Rng::new(seed, &spec.name);
    let v = match spec.init {
        Init::Weight => {
            let fan_in = spec.shape[spec.shape.len() - 1];
            uniform(n, 0.0, 1.0 / (fan_in as f32).sqrt(), &mut rng)
        }
        Init::Scale => uniform(n, 1.0, 0.1, &mut rng),
        Init::Bias => uniform(n, 0.0, 0.05, &mut rng),
    };
    let t = Tensor::from_vec(v, spec.shape.as_slice(), &Device::Cpu)?;
    QTensor::quantize(&t, spec.dtype).with_context(|| format!("quantizing {}", spec.name))
}

/// Generates every tensor of `plan` over `threads` threads (largest first), in plan order.
fn build(plan: &[Spec], seed: u64, threads: usize) -> Result<Vec<QTensor>> {
    let mut order: Vec<usize> = (0..plan.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(plan[i].shape.iter().product::<usize>()));
    let next = AtomicUsize::new(0);
    let slots: Vec<Mutex<Option<QTensor>>> = plan.iter().map(|_| Mutex::new(None)).collect();
    let failure: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    let done = AtomicUsize::new(0);
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| {
                loop {
                    let k = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&i) = order.get(k) else { break };
                    match make_tensor(&plan[i], seed) {
                        Ok(q) => {
                            if let Ok(mut slot) = slots[i].lock() {
                                *slot = Some(q);
                            }
                        }
                        Err(e) => {
                            if let Ok(mut f) = failure.lock() {
                                f.get_or_insert(e);
                            }
                            next.store(order.len(), Ordering::Relaxed);
                            break;
                        }
                    }
                    let d = done.fetch_add(1, Ordering::Relaxed) + 1;
                    if d.is_multiple_of(100) {
                        eprintln!(
                            "{d}/{} tensors, {:.1} s",
                            plan.len(),
                            t0.elapsed().as_secs_f64()
                        );
                    }
                }
            });
        }
    });
    if let Some(e) = failure.into_inner().ok().flatten() {
        return Err(e);
    }
    slots
        .into_iter()
        .zip(plan)
        .map(|(m, spec)| {
            m.into_inner()
                .ok()
                .flatten()
                .with_context(|| format!("{} was not generated", spec.name))
        })
        .collect()
}

fn write(
    path: &str,
    plan: &[Spec],
    tensors: &[QTensor],
    metadata: &[(&str, gguf_file::Value)],
) -> Result<()> {
    let meta: Vec<(&str, &gguf_file::Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let refs: Vec<(&str, &QTensor)> = plan
        .iter()
        .zip(tensors)
        .map(|(s, t)| (s.name.as_str(), t))
        .collect();
    let mut w = BufWriter::with_capacity(
        1 << 24,
        File::create(path).with_context(|| format!("creating {path}"))?,
    );
    gguf_file::write(&mut w, &meta, &refs)?;
    std::io::Write::flush(&mut w)?;
    Ok(())
}

fn summary(plan: &[Spec], tensors: &[QTensor]) -> String {
    let mut by_type: BTreeMap<String, (usize, usize, usize)> = BTreeMap::new();
    for (s, t) in plan.iter().zip(tensors) {
        let e = by_type.entry(format!("{:?}", s.dtype)).or_default();
        e.0 += 1;
        e.1 += s.shape.iter().product::<usize>();
        e.2 += t.storage_size_in_bytes();
    }
    let params: usize = by_type.values().map(|e| e.1).sum();
    let bytes: usize = by_type.values().map(|e| e.2).sum();
    let types: Vec<String> = by_type
        .iter()
        .map(|(k, (n, p, b))| format!("{k}: {n} tensors, {p} params, {b} bytes"))
        .collect();
    format!(
        "{} tensors, {params} params, {bytes} bytes of tensor data ({})",
        plan.len(),
        types.join("; ")
    )
}

struct Opts {
    seed: u64,
    threads: usize,
    double: Option<usize>,
    single: Option<usize>,
    layers: Option<usize>,
}

fn parse_opts(args: &[String]) -> Result<Opts> {
    let mut o = Opts {
        seed: 0,
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        double: None,
        single: None,
        layers: None,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        let n: u64 = value
            .parse()
            .with_context(|| format!("{flag} {value}: not a number"))?;
        match flag.as_str() {
            "--seed" => o.seed = n,
            "--threads" => o.threads = n as usize,
            "--double" => o.double = Some(n as usize),
            "--single" => o.single = Some(n as usize),
            "--layers" => o.layers = Some(n as usize),
            f => bail!("unknown option {f}"),
        }
    }
    Ok(o)
}

fn check_flux(fixture: &str) -> Result<()> {
    let mut r = BufReader::new(File::open(fixture).with_context(|| format!("opening {fixture}"))?);
    let content = gguf_file::Content::read(&mut r).with_context(|| format!("reading {fixture}"))?;
    let plan = flux_plan(&FluxDims::fixture(), GgmlDType::Q5K);
    let mut problems = Vec::new();
    for s in &plan {
        match content.tensor_infos.get(&s.name) {
            None => problems.push(format!("{}: not in the fixture", s.name)),
            Some(info) => {
                if info.shape.dims() != s.shape.as_slice() || info.ggml_dtype != s.dtype {
                    problems.push(format!(
                        "{}: fixture {:?} {:?}, plan {:?} {:?}",
                        s.name,
                        info.shape.dims(),
                        info.ggml_dtype,
                        s.shape,
                        s.dtype
                    ));
                }
            }
        }
    }
    for name in content.tensor_infos.keys() {
        if !plan.iter().any(|s| &s.name == name) {
            problems.push(format!("{name}: in the fixture, not in the plan"));
        }
    }
    if !problems.is_empty() {
        bail!("plan differs from {fixture}:\n{}", problems.join("\n"));
    }
    println!(
        "{fixture}: the {} tensors match the plan (names, shapes, types)",
        plan.len()
    );
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: flux_random_gguf flux|t5 OUT.gguf [--seed N] [--threads N] \
                 [--double N --single N | --layers N]  |  flux_random_gguf check-flux FIXTURE.gguf";
    let (Some(cmd), Some(path)) = (args.get(1), args.get(2)) else {
        bail!("{usage}");
    };
    if cmd == "check-flux" {
        return check_flux(path);
    }
    let o = parse_opts(&args[3..])?;
    let (plan, metadata) = match cmd.as_str() {
        "flux" => {
            let mut d = FluxDims::fill_dev();
            d.double = o.double.unwrap_or(d.double);
            d.single = o.single.unwrap_or(d.single);
            let meta = vec![(
                "general.architecture",
                gguf_file::Value::String("flux".into()),
            )];
            (flux_plan(&d, GgmlDType::Q5K), meta)
        }
        "t5" => {
            let layers = o.layers.unwrap_or(24);
            let u = |x: u32| gguf_file::Value::U32(x);
            let meta = vec![
                (
                    "general.architecture",
                    gguf_file::Value::String("t5encoder".into()),
                ),
                ("t5encoder.context_length", u(512)),
                ("t5encoder.embedding_length", u(4096)),
                ("t5encoder.feed_forward_length", u(10240)),
                ("t5encoder.block_count", u(layers as u32)),
                ("t5encoder.attention.head_count", u(64)),
                ("t5encoder.attention.key_length", u(64)),
                ("t5encoder.attention.value_length", u(64)),
                ("t5encoder.attention.relative_buckets_count", u(32)),
                (
                    "t5encoder.attention.layer_norm_rms_epsilon",
                    gguf_file::Value::F32(1e-6),
                ),
            ];
            (t5_plan(layers), meta)
        }
        _ => bail!("{usage}"),
    };
    let t0 = Instant::now();
    let tensors = build(&plan, o.seed, o.threads)?;
    let gen_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    write(path, &plan, &tensors, &metadata)?;
    println!(
        "{path}: {}; generated + quantized in {gen_s:.1} s on {} threads, written in {:.1} s",
        summary(&plan, &tensors),
        o.threads,
        t1.elapsed().as_secs_f64()
    );
    Ok(())
}

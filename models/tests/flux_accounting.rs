//! Work accounting of one FLUX denoise step on the tiny fixture transformer
//! (`tests/fixtures/flux/bfl`, config `pipeline/transformer/config.json`): the counts the model
//! reports ([`pawfect_models::accounting`]) equal, as integers, the hand formula written out
//! below from the config's numbers, for two image/text token counts.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use pawfect_models::accounting::{self, WorkCounts};
use pawfect_models::checkpoint::{LinearOpts, QuantMatmul, SafetensorsStore};
use pawfect_models::flux::config::TransformerConfig;
use pawfect_models::flux::sampling::Rope;
use pawfect_models::flux::transformer::{FluxTransformer, Loader};

type R<T = ()> = Result<T, Box<dyn std::error::Error>>;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/flux")
}

fn transformer() -> R<FluxTransformer> {
    let cfg: TransformerConfig = serde_json::from_str(&std::fs::read_to_string(
        fixtures().join("pipeline/transformer/config.json"),
    )?)?;
    let store = SafetensorsStore::open(
        &[fixtures().join("bfl/flux1-fill-dev.safetensors")],
        &Device::Cpu,
    )?;
    let loader = Loader {
        store: &store,
        layout: Loader::detect_layout(&store)?,
        opts: LinearOpts {
            dtype: DType::F32,
            quant: QuantMatmul::Auto,
        },
    };
    Ok(FluxTransformer::load(&loader, &cfg)?)
}

/// One step as the pipeline runs it (conditioning, then the forward), measured.
fn one_step(tr: &FluxTransformer, t: usize, h2: usize, w2: usize) -> R<WorkCounts> {
    let cfg = tr.config();
    let dev = Device::Cpu;
    let l = h2 * w2;
    let img = Tensor::randn(0f32, 1.0, (1, l, cfg.in_channels), &dev)?;
    let txt = Tensor::randn(0f32, 1.0, (1, t, cfg.joint_attention_dim), &dev)?;
    let pooled = Tensor::randn(0f32, 1.0, (1, cfg.pooled_projection_dim), &dev)?;
    let rope = Rope::new(t, h2, w2, &cfg.axes_dims_rope, cfg.theta, &dev)?;
    let (out, work) = accounting::measure(|| -> R<Tensor> {
        let temb = tr.conditioning(&[500.0], Some(&[30_000.0]), &pooled)?;
        Ok(tr.forward(&img, &txt, &temb, &rope)?)
    });
    assert_eq!(out?.dims(), [1, l, cfg.out_channels()]);
    Ok(work)
}

/// The hand formula for B = 1, `t` text and `l` image tokens, f32 activations.
fn expected(cfg: &TransformerConfig, t: u64, l: u64) -> WorkCounts {
    let h = cfg.hidden_size() as u64; // 64
    let heads = cfg.num_attention_heads as u64; // 2
    let d = cfg.attention_head_dim as u64; // 32
    let mh = cfg.mlp_hidden() as u64; // 256
    let c_in = cfg.in_channels as u64; // 384
    let c_txt = cfg.joint_attention_dim as u64; // 64
    let pooled = cfg.pooled_projection_dim as u64; // 32
    let c_out = cfg.out_channels() as u64; // 64
    let n_double = cfg.num_layers as u64; // 2
    let n_single = cfg.num_single_layers as u64; // 2
    let n = t + l; // joint sequence
    let gemm = |m: u64, nn: u64, k: u64| 2 * m * nn * k;

    // Embedders: time_in and guidance_in (256 → H → H), vector_in (pooled → H → H), on 1 row;
    // img_in over the image tokens, txt_in over the text tokens.
    let embed = 2 * (gemm(1, h, 256) + gemm(1, h, h))
        + gemm(1, h, pooled)
        + gemm(1, h, h)
        + gemm(l, h, c_in)
        + gemm(t, h, c_txt);
    // Double block, per stream of s tokens: modulation (H → 6H on temb), QKV (H → 3H),
    // out-proj (H → H), MLP in (H → mh) and out (mh → H).
    let stream = |s: u64| {
        gemm(1, 6 * h, h) + gemm(s, 3 * h, h) + gemm(s, h, h) + gemm(s, mh, h) + gemm(s, h, mh)
    };
    let double = stream(l) + stream(t);
    // Single block over the joint sequence: modulation (H → 3H), linear1 (H → 3H + mh),
    // linear2 (H + mh → H).
    let single = gemm(1, 3 * h, h) + gemm(n, 3 * h + mh, h) + gemm(n, h, h + mh);
    // Final layer: modulation (H → 2H), linear over the image tokens (H → out).
    let last = gemm(1, 2 * h, h) + gemm(l, c_out, h);
    let f16_gemm_flop = embed + n_double * double + n_single * single + last;

    // Every block attends over the joint sequence: 4·B·heads·N·N·D.
    let attention_flop = (n_double + n_single) * 4 * heads * n * n * d;

    // Memory-bound elements (read + written), f32 = 4 bytes each.
    // Conditioning: SiLU inside three MLP embedders (1×H in, 1×H out), two adds (2 in, 1 out);
    // the forward's SiLU of temb.
    let cond = 3 * 2 * h + 2 * 3 * h + 2 * h;
    // LayerNorm+modulate over s tokens: x, shift, scale in, out.
    let nm = |s: u64| 2 * s * h + 2 * h;
    // QK-RMSNorm+RoPE of q or k over s tokens: x (s·H), gain (D), cos and sin (s·D/2 each), out.
    let rope = |s: u64| 2 * s * h + d + s * d;
    // Gated residual: x, gate (H), y in, out.
    let gated = |s: u64| 3 * s * h + h;
    let double_mem = 2 * (nm(l) + nm(t))           // two norm-modulates per stream
        + 2 * (rope(l) + rope(t))                  // q and k of each stream
        + 3 * 2 * n * h                            // cat of q, k, v: parts in, joint out
        + 2 * (gated(l) + gated(t)); // two gated residuals per stream
    let single_mem = nm(n) + 2 * rope(n) + 2 * n * (h + mh) + gated(n); // + cat(attn, mlp)
    let final_mem = nm(l);
    let elems = cond
        + n_double * double_mem
        + 2 * n * h // cat(txt, img) before the single blocks
        + n_single * single_mem
        + final_mem;
    WorkCounts {
        f16_gemm_flop,
        int8_gemm_op: 0,
        attention_flop,
        memory_bound_bytes: 4 * elems,
    }
}

#[test]
fn one_step_counts_match_the_hand_formula() -> R {
    let tr = transformer()?;
    for (t, h2, w2) in [(7, 4, 6), (16, 2, 3)] {
        let got = one_step(&tr, t, h2, w2)?;
        let want = expected(tr.config(), t as u64, (h2 * w2) as u64);
        assert_eq!(got, want, "{t} text + {h2}×{w2} image tokens");
    }
    // The first case written out from the config (H 64, 2 heads of 32, mlp 256, in 384,
    // txt 64, pooled 32, out 64, 2 + 2 blocks) for T = 7, L = 24, N = 31.
    let got = one_step(&tr, 7, 4, 6)?;
    assert_eq!(got.f16_gemm_flop, 13_979_648);
    assert_eq!(got.attention_flop, 984_064);
    Ok(())
}

#[test]
fn nothing_is_counted_outside_a_measurement() -> R {
    let tr = transformer()?;
    let ((), before) = accounting::measure(|| ());
    assert_eq!(before, WorkCounts::default());
    // Run a step outside any measurement, then measure an empty closure: still zero.
    let cfg = tr.config();
    let dev = Device::Cpu;
    let pooled = Tensor::zeros((1, cfg.pooled_projection_dim), DType::F32, &dev)?;
    tr.conditioning(&[1.0], Some(&[1.0]), &pooled)?;
    let ((), after) = accounting::measure(|| ());
    assert_eq!(after, WorkCounts::default());
    Ok(())
}

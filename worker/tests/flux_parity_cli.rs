//! `pawfect-worker inpaint` end to end on the tiny FLUX fixture pipeline (`tools/fixtures_flux.py`):
//! the binary's image must match diffusers' 2-step output. The model maths are checked piece by
//! piece in `models/tests/flux_parity.rs`; this checks that the CLI wires them the same way.

use std::path::{Path, PathBuf};

use serde_json::Value;

type R<T = ()> = Result<T, Box<dyn std::error::Error>>;

fn fixtures() -> PathBuf {
    let base = std::env::var_os("PAWFECT_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures"));
    base.join("flux")
}

fn manifest() -> R<Value> {
    Ok(serde_json::from_str(&std::fs::read_to_string(
        fixtures().join("manifest.json"),
    )?)?)
}

fn prompt() -> R<String> {
    Ok(manifest()?["prompt"]
        .as_str()
        .ok_or("manifest has no prompt")?
        .to_string())
}

fn t5_len() -> R<usize> {
    Ok(manifest()?["t5_len"]
        .as_u64()
        .ok_or("manifest has no t5_len")? as usize)
}

#[test]
fn flux_parity_cli_binary() -> R {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("out.png");
    let m = manifest()?;
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_pawfect-worker"))
        .args([
            "inpaint",
            "--full-frame",
            "--device",
            "cpu",
            "--dtype",
            "f32",
            "--models",
        ])
        .arg(fixtures().join("pipeline"))
        .arg("--image")
        .arg(fixtures().join("image.png"))
        .arg("--mask")
        .arg(fixtures().join("mask.png"))
        .arg("--noise")
        .arg(fixtures().join("noise.safetensors"))
        .args([
            "--steps",
            &m["steps"].to_string(),
            "--guidance",
            &m["guidance"].to_string(),
        ])
        .args([
            "--max-sequence-length",
            &t5_len()?.to_string(),
            "--prompt",
            &prompt()?,
        ])
        .arg("--out")
        .arg(&out)
        .status()?;
    assert!(status.success(), "pawfect-worker inpaint failed: {status}");
    let got = image::open(&out)?.to_rgb8();
    let expected = image::open(fixtures().join("expected_2steps.png"))?.to_rgb8();
    assert_eq!(got.dimensions(), expected.dimensions());
    let mae = got
        .as_raw()
        .iter()
        .zip(expected.as_raw())
        .map(|(a, b)| (*a as f64 - *b as f64).abs())
        .sum::<f64>()
        / expected.as_raw().len() as f64;
    eprintln!("cli image mean abs err {mae:.3} / 255");
    assert!(mae <= 1.0, "cli image mean abs error {mae} / 255");
    Ok(())
}

/// `inpaint --json` on the example photo with the tiny fixture models (CPU, f32) and `extra`
/// flags: the parsed summary, or the worker's stderr when it failed. Small crops keep the CPU
/// run quick; the counts follow whatever shapes ran.
fn inpaint_json(prompt: &str, extra: &[&str]) -> R<Value> {
    let dir = tempfile::tempdir()?;
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/photo");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_pawfect-worker"))
        .args(["inpaint", "--json", "--device", "cpu", "--dtype", "f32"])
        .arg("--models")
        .arg(fixtures().join("pipeline"))
        .arg("--image")
        .arg(examples.join("dog-on-lawn.jpg"))
        .arg("--mask")
        .arg(examples.join("leash-mask.png"))
        .args(["--prompt", prompt])
        .args(["--crop-min-side", "128", "--crop-max-side", "256"])
        .args(extra)
        .arg("--out")
        .arg(dir.path().join("out.png"))
        .output()?;
    if !run.status.success() {
        return Err(format!("inpaint failed: {}", String::from_utf8_lossy(&run.stderr)).into());
    }
    Ok(serde_json::from_slice(&run.stdout)?)
}

/// `inpaint --json` on the example photo with the tiny fixture models: the work counts per
/// stage and in total, and the denoise attention FLOP equal to the formula for the crops and
/// text length the run reports (`4·heads·N²·D` per block and step, N = text + image tokens).
#[test]
fn inpaint_json_reports_the_work_per_stage() -> R {
    let steps = 2u64;
    let s = inpaint_json(
        "green grass lawn, seamless continuation, no objects",
        &["--steps", &steps.to_string()],
    )?;
    let work = &s["work"];
    let classes = [
        "f16GemmFlop",
        "int8GemmOp",
        "attentionFlop",
        "memoryBoundBytes",
    ];
    let get = |stage: &str, class: &str| work[stage][class].as_u64();
    // A spec prompt: Florence-2 never ran.
    assert!(work.get("caption").is_none(), "{work}");
    for class in classes {
        let sum: u64 = ["encode", "denoise", "decode"]
            .iter()
            .map(|st| get(st, class).unwrap_or(0))
            .sum();
        assert_eq!(get("total", class), Some(sum), "total {class}: {work}");
    }
    for stage in ["encode", "denoise", "decode"] {
        assert!(
            get(stage, "f16GemmFlop").unwrap_or(0) > 0,
            "{stage}: {work}"
        );
        assert!(
            get(stage, "memoryBoundBytes").unwrap_or(0) > 0,
            "{stage}: {work}"
        );
        // Dense f32 weights: no int8 GEMM anywhere.
        assert_eq!(get(stage, "int8GemmOp"), Some(0), "{stage}: {work}");
    }
    // T5 and CLIP ran (no cache across processes): the encode stage attends.
    assert!(get("encode", "attentionFlop").unwrap_or(0) > 0, "{work}");

    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(
        fixtures().join("pipeline/transformer/config.json"),
    )?)?;
    let num = |k: &str| cfg[k].as_u64().ok_or(format!("config has no {k}"));
    let blocks = num("num_layers")? + num("num_single_layers")?;
    let (heads, d) = (num("num_attention_heads")?, num("attention_head_dim")?);
    let t = s["maxSequenceLength"].as_u64().ok_or("maxSequenceLength")?;
    assert_eq!(s["steps"].as_u64(), Some(steps));
    let crops = s["crops"].as_array().ok_or("crops")?;
    assert!(!crops.is_empty());
    let attention: u64 = crops
        .iter()
        .map(|c| {
            let (w, h) = (
                c["target"][0].as_u64().unwrap_or(0),
                c["target"][1].as_u64().unwrap_or(0),
            );
            let n = t + (w / 16) * (h / 16);
            steps * blocks * 4 * heads * n * n * d
        })
        .sum();
    assert_eq!(get("denoise", "attentionFlop"), Some(attention), "{s}");
    Ok(())
}

/// `inpaint --cache-threshold`: the First-Block Cache's steps reach `work.steps`, every step is
/// either computed or cached, the first step of each crop is always computed, and a cached step
/// issues the attention of one block instead of all of them.
#[test]
fn inpaint_cache_threshold_reports_the_steps_it_skipped() -> R {
    let run =
        |extra: &[&str]| inpaint_json("green grass lawn", &[&["--steps", "4"], extra].concat());
    let dense = run(&[])?;
    let crops = dense["crops"].as_array().ok_or("crops")?.len() as u64;
    let steps = |s: &Value, k: &str| s["work"]["steps"][k].as_u64();
    assert_eq!(steps(&dense, "computed"), Some(4 * crops), "{dense}");
    assert_eq!(steps(&dense, "cached"), Some(0), "{dense}");
    // Threshold 0 computes every step (a change is never ≤ 0 unless nothing moved).
    let zero = run(&["--cache-threshold", "0"])?;
    // (Its memory-bound bytes are higher: the residual comparison itself.)
    assert_eq!(zero["work"]["steps"], dense["work"]["steps"], "{zero}");
    for class in ["f16GemmFlop", "attentionFlop"] {
        assert_eq!(
            zero["work"]["denoise"][class], dense["work"]["denoise"][class],
            "{class}: {zero}"
        );
    }
    // The largest threshold skips whenever the first block moved less than its own residual.
    let cached = run(&["--cache-threshold", "1"])?;
    let (c, k) = (
        steps(&cached, "computed").ok_or("computed")?,
        steps(&cached, "cached").ok_or("cached")?,
    );
    assert_eq!(c + k, 4 * crops, "{cached}");
    assert!(
        c >= crops,
        "a crop's first step has nothing to compare: {cached}"
    );
    let attn = |s: &Value| s["work"]["denoise"]["attentionFlop"].as_u64().unwrap_or(0);
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(
        fixtures().join("pipeline/transformer/config.json"),
    )?)?;
    let blocks = cfg["num_layers"].as_u64().ok_or("num_layers")?
        + cfg["num_single_layers"]
            .as_u64()
            .ok_or("num_single_layers")?;
    // Per crop and step, a dense step attends `blocks` times, a cached one once; with crops of
    // one size (one attention cost a) the totals are exact: dense = 4·crops·blocks·a.
    let per_block_step = attn(&dense) / (4 * crops * blocks);
    let sizes: std::collections::BTreeSet<_> = dense["crops"]
        .as_array()
        .ok_or("crops")?
        .iter()
        .map(|c| c["target"].to_string())
        .collect();
    if sizes.len() == 1 {
        assert_eq!(attn(&cached), per_block_step * (c * blocks + k), "{cached}");
    }
    assert_eq!(k > 0, attn(&cached) < attn(&dense), "{cached}");
    // Out of range: refused before any model is loaded.
    assert!(run(&["--cache-threshold", "1.5"]).is_err());
    Ok(())
}

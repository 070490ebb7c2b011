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

//! GGUF dequantization against the exact reference, gguf-py's `gguf.quants.dequantize` (f32, the
//! order of ggml's own dequantizers), on the fixtures of `tools/fixtures_gguf.py`
//! (`$PAWFECT_FIXTURES/gguf`, default `tests/fixtures/gguf`) and on the FLUX fixture GGUFs.
//!
//! Required: the same f32 bits for every element. Every block format is `d·q`, `d·q + m` or
//! `(d·sc)·q − dmin·m` with the products and the difference taken in the same order in ggml,
//! gguf-py and candle's CPU code, no fused multiply-add (Rust does not contract `a*b - c`; NumPy
//! evaluates each array op separately), and every f16 → f32 and integer → f32 conversion exact.
//! So there is no rounding-order slack to allow for, and no ulp tolerance is given.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device};
use pawfect_models::checkpoint::{GgufStore, WeightStore, supported_ggml_types};

type R<T = ()> = Result<T, Box<dyn std::error::Error>>;

fn base() -> PathBuf {
    std::env::var_os("PAWFECT_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("tests")
                .join("fixtures")
        })
}

fn dir() -> PathBuf {
    base().join("gguf")
}

/// `Q5_K` (ggml, gguf-py) and `Q5K` (candle's Debug name) compare equal.
fn norm(name: &str) -> String {
    name.replace('_', "").to_ascii_uppercase()
}

/// Stored type of every tensor, in candle's names.
fn stored_types(path: &Path) -> R<HashMap<String, String>> {
    let mut f = std::fs::File::open(path)?;
    let c = gguf_file::Content::read(&mut f)?;
    Ok(c.tensor_infos
        .iter()
        .map(|(n, i)| (n.clone(), norm(&format!("{:?}", i.ggml_dtype))))
        .collect())
}

fn reference() -> R<HashMap<String, candle_core::Tensor>> {
    Ok(candle_core::safetensors::load(
        dir().join("dequant_ref.safetensors"),
        &Device::Cpu,
    )?)
}

#[test]
fn gguf_dequant_every_supported_type_has_fixtures() -> R {
    let types = stored_types(&dir().join("dequant.gguf"))?;
    let reference = reference()?;
    let supported = supported_ggml_types();
    assert!(supported.len() >= 13, "{supported:?}");
    for (id, name) in supported {
        for variant in ["gauss", "bytes"] {
            let t = format!("{name}.{variant}");
            let stored = types
                .get(&t)
                .ok_or_else(|| format!("type {name} ({id}) is accepted but has no fixture {t}"))?;
            assert_eq!(*stored, norm(name), "{t} is stored as {stored}");
            assert!(reference.contains_key(&t), "no reference for {t}");
        }
    }
    Ok(())
}

/// Elements whose f32 bits differ, and the largest difference in ulps (bit patterns as ordered ints).
fn bit_diff(got: &[f32], want: &[f32]) -> (usize, u64, Option<usize>) {
    let ord = |x: f32| {
        let b = x.to_bits() as i64;
        if b < 0x8000_0000 { b } else { 0x8000_0000 - b }
    };
    let mut n = 0;
    let mut max = 0;
    let mut first = None;
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        if a.to_bits() != b.to_bits() {
            n += 1;
            max = max.max(ord(*a).abs_diff(ord(*b)));
            first.get_or_insert(i);
        }
    }
    (n, max, first)
}

#[test]
fn gguf_dequant_matches_gguf_py_bit_for_bit() -> R {
    let store = GgufStore::open(&dir().join("dequant.gguf"), &Device::Cpu)?;
    let reference = reference()?;
    let mut names: Vec<&String> = reference.keys().collect();
    names.sort();
    let mut failures = vec![];
    for name in names {
        let want = &reference[name];
        let want_v = want.flatten_all()?.to_vec1::<f32>()?;
        // The loader's dense path (GgufStore::dense → QTensor::dequantize), as QuantMatmul::Dequant uses.
        let got = store.dense(name, DType::F32)?;
        assert_eq!(got.dims(), want.dims(), "{name}: shape");
        let got_v = got.flatten_all()?.to_vec1::<f32>()?;
        let (n, ulps, first) = bit_diff(&got_v, &want_v);
        eprintln!(
            "{name}: {} elements, {n} differ (max {ulps} ulp)",
            want_v.len()
        );
        if let Some(i) = first {
            failures.push(format!(
                "{name}: {n} of {} elements differ, max {ulps} ulp; first at {i}: {} vs gguf-py {}",
                want_v.len(),
                got_v[i],
                want_v[i]
            ));
        }
        // QuantMatmul::DequantF16 on the CPU: one rounding of the exact f32 value to f16 (the
        // premise of the f16-path bounds in flux_parity.rs).
        if let Some(q) = store.quantized(name)? {
            let h = q
                .dequantize_f16(&Device::Cpu)?
                .flatten_all()?
                .to_vec1::<half::f16>()?;
            let bad = h
                .iter()
                .zip(&want_v)
                .filter(|(a, b)| a.to_bits() != half::f16::from_f32(**b).to_bits())
                .count();
            if bad > 0 {
                failures.push(format!(
                    "{name}: f16 dequantization is not f16(exact) at {bad} elements"
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

/// Order-sensitive digest of f32 bit patterns: Σ bits(xᵢ)·(2i+1) mod 2⁶⁴. Each multiplier is
/// odd, so changing any single element changes the digest. `tools/fixtures_flux.py` computes the
/// same over gguf-py's dequantization.
fn digest(v: &[f32]) -> u64 {
    v.iter().enumerate().fold(0u64, |acc, (i, x)| {
        acc.wrapping_add((x.to_bits() as u64).wrapping_mul(2 * i as u64 + 1))
    })
}

#[test]
fn gguf_dequant_flux_fixture_files_match_gguf_py() -> R {
    let flux = base().join("flux");
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(flux.join("manifest.json"))?)?;
    let files = m["gguf_dequant_digest"]
        .as_object()
        .ok_or("manifest has no gguf_dequant_digest")?;
    assert!(files.len() >= 2, "{files:?}");
    for (file, tensors) in files {
        let store = GgufStore::open(&flux.join(file), &Device::Cpu)?;
        let tensors = tensors.as_object().ok_or("digests")?;
        let mut per_type: BTreeMap<String, usize> = BTreeMap::new();
        let types = stored_types(&flux.join(file))?;
        for name in store.names() {
            if store.quantized(&name)?.is_none() {
                continue;
            }
            let want = tensors
                .get(&name)
                .and_then(|v| v.as_str())
                .ok_or_else(|| format!("{file}: no digest for quantized tensor {name}"))?;
            let v = store
                .dense(&name, DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            assert_eq!(
                format!("{:016x}", digest(&v)),
                want,
                "{file}: {name} differs from gguf-py's dequantization"
            );
            *per_type.entry(types[&name].clone()).or_default() += 1;
        }
        assert_eq!(per_type.values().sum::<usize>(), tensors.len(), "{file}");
        eprintln!("{file}: {per_type:?} tensors equal gguf-py's dequantization");
    }
    Ok(())
}

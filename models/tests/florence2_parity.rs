//! Florence-2 parity against transformers (tiny random-weight model, f32 on the CPU).
//!
//! Fixtures: `tools/make_fixtures.py florence2 --seed N --out $PAWFECT_FIXTURES/florence2`
//! (default `tests/fixtures` at the workspace root).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, IndexOp, Tensor};
use pawfect_models::florence2::processor::{florence_special_tokens, preprocess};
use pawfect_models::florence2::{Florence2, FlorenceTokenizer, Layout, Task};
use serde_json::Value;

const TOL: f32 = 1e-4;

fn fixtures() -> PathBuf {
    let root = std::env::var_os("PAWFECT_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures"));
    root.join("florence2")
}

struct Fx {
    dir: PathBuf,
    refs: HashMap<String, Tensor>,
    expected: Value,
}

fn load_fixtures() -> Fx {
    let dir = fixtures();
    let refs = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu)
        .unwrap_or_else(|e| panic!("reading fixtures in {}: {e}", dir.display()));
    let expected: Value =
        serde_json::from_slice(&std::fs::read(dir.join("expected.json")).unwrap()).unwrap();
    Fx {
        dir,
        refs,
        expected,
    }
}

impl Fx {
    fn r(&self, name: &str) -> &Tensor {
        self.refs
            .get(name)
            .unwrap_or_else(|| panic!("reference tensor {name} missing"))
    }
    fn model(&self, layout: &str) -> Florence2 {
        Florence2::load(self.dir.join(layout), &Device::Cpu, DType::F32).unwrap()
    }
    fn ids(v: &Value) -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    }
}

/// max |a − b| / max |b|.
fn rel_err(got: &Tensor, want: &Tensor) -> f32 {
    assert_eq!(got.dims(), want.dims(), "shape");
    let got = got.to_dtype(DType::F32).unwrap();
    let diff = (&got - want)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let scale = want
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    diff / scale.max(1e-12)
}

fn assert_close(name: &str, got: &Tensor, want: &Tensor) {
    let e = rel_err(got, want);
    eprintln!("{name}: rel-err {e:.2e}");
    assert!(e <= TOL, "{name}: rel-err {e:.3e} > {TOL:e}");
}

/// Channels-last `[B, H, W, C]` → `[B, C, H, W]`.
fn nchw(x: &Tensor) -> Tensor {
    x.permute((0, 3, 1, 2)).unwrap().contiguous().unwrap()
}

#[test]
fn florence2_parity_pixel_values() {
    let fx = load_fixtures();
    let model = fx.model("native");
    let cfg = &model.config().image;
    // The caption image is already at the processor size: exact.
    let img = image::open(fx.dir.join("caption.png")).unwrap().to_rgb8();
    let pv = preprocess(&img, cfg, &Device::Cpu).unwrap();
    assert_close("pixel_values (no resize)", &pv, fx.r("pixel_values"));
    // Non-square image, downscaled in x and upscaled in y: within one 8-bit level.
    let img = image::open(fx.dir.join("resize.png")).unwrap().to_rgb8();
    let pv = preprocess(&img, cfg, &Device::Cpu).unwrap();
    let std = Tensor::new(&cfg.image_std, &Device::Cpu)
        .unwrap()
        .reshape((1, 3, 1, 1))
        .unwrap();
    let d = (&pv - fx.r("pixel_values_resize"))
        .unwrap()
        .abs()
        .unwrap()
        .broadcast_mul(&std)
        .unwrap();
    let max_levels = d
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        * 255.0;
    eprintln!("resize: max difference {max_levels:.4} levels of 255");
    assert!(
        max_levels <= 1.0 + 1e-3,
        "resize differs by {max_levels} levels"
    );
}

#[test]
fn florence2_parity_tokenizer_prompts() {
    let fx = load_fixtures();
    let native = FlorenceTokenizer::from_dir(&fx.dir.join("native")).unwrap();
    let original = FlorenceTokenizer::from_dir(&fx.dir.join("original")).unwrap();
    for task in Task::ALL {
        let want = Fx::ids(&fx.expected["tasks"][task.token()]["prompt_ids"]);
        assert_eq!(native.prompt_ids(task).unwrap(), want, "{task} (native)");
        assert_eq!(
            original.prompt_ids(task).unwrap(),
            want,
            "{task} (original)"
        );
    }
    // The original tokenizer.json lacks the Florence tokens; they are added with the ids the
    // native tokenizer stores.
    for t in florence_special_tokens() {
        assert_eq!(original.token_to_id(&t), native.token_to_id(&t), "{t}");
    }
    assert_eq!(
        original.vocab_size() as u64,
        fx.expected["original_vocab"].as_u64().unwrap()
    );
    // The image placeholders of the native processor precede exactly these prompt ids.
    let input_ids = fx.r("input_ids").i(0).unwrap().to_vec1::<i64>().unwrap();
    let n_img = fx.expected["n_image_tokens"].as_u64().unwrap() as usize;
    let prompt: Vec<u32> = input_ids[n_img..].iter().map(|&x| x as u32).collect();
    assert_eq!(prompt, native.prompt_ids(Task::DetailedCaption).unwrap());
}

fn check_stages(fx: &Fx, model: &Florence2, label: &str) -> Tensor {
    let (features, stages) = model.vision_features(fx.r("pixel_values"), true).unwrap();
    for (i, s) in stages.iter().enumerate() {
        assert_close(
            &format!("{label} vision stage {i}"),
            &nchw(s),
            fx.r(&format!("vision_stage{i}")),
        );
    }
    assert_close(
        &format!("{label} vision features"),
        &nchw(&features),
        fx.r("vision_features"),
    );
    let tokens = model.image_tokens(&features).unwrap();
    assert_close(
        &format!("{label} image tokens"),
        &tokens,
        fx.r("image_features"),
    );
    let prompt = model.tokenizer().prompt_ids(Task::DetailedCaption).unwrap();
    let enc = model
        .encode(&model.encoder_input(&tokens, &prompt).unwrap())
        .unwrap();
    assert_close(
        &format!("{label} encoder output"),
        &enc,
        fx.r("encoder_output"),
    );
    enc
}

#[test]
fn florence2_parity_stages_native() {
    let fx = load_fixtures();
    let model = fx.model("native");
    assert_eq!(model.layout(), Layout::Native);
    let enc = check_stages(&fx, &model, "native");
    let dec_ids = fx.r("decoder_input_ids").to_dtype(DType::U32).unwrap();
    let logits = model.decoder_logits(&enc, &dec_ids).unwrap();
    assert_close("native decoder logits", &logits, fx.r("decoder_logits"));
}

#[test]
fn florence2_parity_generation_native() {
    let fx = load_fixtures();
    let model = fx.model("native");
    let max_new = fx.expected["max_new_tokens"].as_u64().unwrap() as usize;
    let base = model.default_generation().with_max_new_tokens(max_new);
    assert_eq!(
        (base.num_beams, base.no_repeat_ngram_size),
        (3, 3),
        "generation_config.json defaults"
    );
    for task in Task::ALL {
        let want = &fx.expected["tasks"][task.token()];
        let enc = model.encode_image(fx.r("pixel_values"), task).unwrap();
        for (mode, gcfg) in [
            ("greedy", base.clone().greedy()),
            ("beam3", base.clone().with_beams(3)),
        ] {
            let ids = model.generate_ids(&enc, &gcfg).unwrap();
            assert_eq!(ids, Fx::ids(&want[mode]["ids"]), "{task} {mode}");
            assert_eq!(
                model.tokenizer().decode(&ids).unwrap(),
                want[mode]["decoded"].as_str().unwrap(),
                "{task} {mode}"
            );
            assert_eq!(
                model.tokenizer().caption_text(&ids).unwrap(),
                want[mode]["caption"].as_str().unwrap(),
                "{task} {mode}"
            );
        }
    }
    // The whole path from the image file (identity resize at the processor size) agrees too.
    let img = image::open(fx.dir.join("caption.png")).unwrap().to_rgb8();
    let c = model.caption(&img, Task::DetailedCaption, &base).unwrap();
    assert_eq!(
        c.ids,
        Fx::ids(&fx.expected["tasks"]["<DETAILED_CAPTION>"]["beam3"]["ids"])
    );
}

#[test]
fn florence2_parity_original_layout() {
    let fx = load_fixtures();
    let model = fx.model("original");
    assert_eq!(model.layout(), Layout::Original);
    // Same weights under the original names (and the 51289-analog vocabulary): same stages.
    let enc = check_stages(&fx, &model, "original");
    let dec_ids = fx.r("decoder_input_ids").to_dtype(DType::U32).unwrap();
    let logits = model.decoder_logits(&enc, &dec_ids).unwrap();
    let v = model.config().text.vocab_size;
    assert_close(
        "original decoder logits",
        &logits,
        &fx.r("decoder_logits").narrow(2, 0, v).unwrap(),
    );
    // Generation settings come from config.json's text_config (no generation_config.json).
    let max_new = fx.expected["max_new_tokens"].as_u64().unwrap() as usize;
    let base = model.default_generation().with_max_new_tokens(max_new);
    assert_eq!(
        (
            base.num_beams,
            base.no_repeat_ngram_size,
            base.forced_bos_token_id
        ),
        (3, 3, Some(0))
    );
    for (mode, gcfg) in [("greedy", base.clone().greedy()), ("beam3", base.clone())] {
        let ids = model.generate_ids(&enc, &gcfg).unwrap();
        assert_eq!(
            ids,
            Fx::ids(&fx.expected["original"][mode]),
            "original {mode}"
        );
    }
}

#[test]
fn florence2_parity_incremental_decoding_matches_full() {
    let fx = load_fixtures();
    let model = fx.model("native");
    let enc = model
        .encode_image(fx.r("pixel_values"), Task::DetailedCaption)
        .unwrap();
    let ids = fx.r("decoder_input_ids").to_dtype(DType::U32).unwrap();
    let full = model.decoder_logits(&enc, &ids).unwrap();
    // logits of the first k positions do not depend on later tokens (causality)
    let k = 3;
    let prefix = model
        .decoder_logits(&enc, &ids.narrow(1, 0, k).unwrap())
        .unwrap();
    assert_close(
        "causal prefix",
        &prefix,
        &full.narrow(1, 0, k).unwrap().contiguous().unwrap(),
    );
}

#[test]
fn florence2_parity_beam_settings() {
    use pawfect_models::florence2::EarlyStopping;
    let fx = load_fixtures();
    let model = fx.model("native");
    let max_new = fx.expected["max_new_tokens"].as_u64().unwrap() as usize;
    let enc = model
        .encode_image(fx.r("pixel_values"), Task::DetailedCaption)
        .unwrap();
    let variants = fx.expected["variants"].as_array().unwrap();
    assert!(!variants.is_empty());
    for v in variants {
        let s = &v["settings"];
        let mut g = model.default_generation().with_max_new_tokens(max_new);
        g.num_beams = s["num_beams"].as_u64().unwrap() as usize;
        if let Some(lp) = s.get("length_penalty") {
            g.length_penalty = lp.as_f64().unwrap();
        }
        if let Some(n) = s.get("no_repeat_ngram_size") {
            g.no_repeat_ngram_size = n.as_u64().unwrap() as usize;
        }
        match s.get("early_stopping") {
            Some(Value::Bool(true)) | None => {}
            Some(Value::Bool(false)) => g.early_stopping = EarlyStopping::False,
            Some(Value::String(x)) if x == "never" => g.early_stopping = EarlyStopping::Never,
            Some(other) => panic!("unexpected early_stopping {other}"),
        }
        assert_eq!(
            model.generate_ids(&enc, &g).unwrap(),
            Fx::ids(&v["ids"]),
            "{s}"
        );
    }
}

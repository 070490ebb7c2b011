//! Florence-2 processor: image preprocessing, task prompts, tokenizer, post-processing.
//!
//! The resize is Pillow's two-pass bicubic resampling (`Resample.c`: a = −0.5, support scaled by
//! the downscale factor, i.e. antialiased, 22-bit fixed-point coefficients, horizontal pass first
//! into an 8-bit image, then vertical), which transformers' PIL image-processor backend uses.
//! Rescale is `u8 · factor` in f64 cast to f32, normalisation `(x − mean) / std` in f32.

use std::path::Path;

use candle_core::{Device, Tensor};
use image::RgbImage;
use tokenizers::{AddedToken, Tokenizer};

use super::Florence2Error;
use super::config::ImageProcessorConfig;

/// Captioning tasks and the prompts Florence-2 was trained with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Task {
    /// `<CAPTION>`: one short sentence.
    Caption,
    /// `<DETAILED_CAPTION>`: a few sentences (the worker's default).
    DetailedCaption,
    /// `<MORE_DETAILED_CAPTION>`: a paragraph.
    MoreDetailedCaption,
}

impl Task {
    pub const ALL: [Task; 3] = [
        Task::Caption,
        Task::DetailedCaption,
        Task::MoreDetailedCaption,
    ];

    /// The task token, e.g. `<DETAILED_CAPTION>`.
    pub fn token(self) -> &'static str {
        match self {
            Task::Caption => "<CAPTION>",
            Task::DetailedCaption => "<DETAILED_CAPTION>",
            Task::MoreDetailedCaption => "<MORE_DETAILED_CAPTION>",
        }
    }

    /// The text the task token stands for.
    pub fn prompt(self) -> &'static str {
        match self {
            Task::Caption => "What does the image describe?",
            Task::DetailedCaption => "Describe in detail what is shown in the image.",
            Task::MoreDetailedCaption => "Describe with a paragraph what is shown in the image.",
        }
    }
}

impl std::str::FromStr for Task {
    type Err = Florence2Error;

    /// Accepts the task token (`<DETAILED_CAPTION>`) or its bare name (`DETAILED_CAPTION`,
    /// `detailed_caption`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let name = s
            .trim()
            .trim_start_matches('<')
            .trim_end_matches('>')
            .to_ascii_uppercase();
        Task::ALL
            .into_iter()
            .find(|t| t.token()[1..t.token().len() - 1] == name)
            .ok_or_else(|| {
                Florence2Error::Input(format!(
                    "unknown task {s:?} (supported: <CAPTION>, <DETAILED_CAPTION>, <MORE_DETAILED_CAPTION>)"
                ))
            })
    }
}

impl std::fmt::Display for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.token())
    }
}

/// Special tokens the original Florence-2 processor adds at run time, in id order after the BART
/// vocabulary (`<od>` = 50265 … `<and>` = 51288 for Florence-2-base).
pub fn florence_special_tokens() -> Vec<String> {
    let mut t: Vec<String> = ["<od>", "</od>", "<ocr>", "</ocr>"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    t.extend((0..1000).map(|i| format!("<loc_{i}>")));
    t.extend(
        [
            "<cap>",
            "</cap>",
            "<ncap>",
            "</ncap>",
            "<dcap>",
            "</dcap>",
            "<grounding>",
            "</grounding>",
            "<seg>",
            "</seg>",
            "<sep>",
            "<region_cap>",
            "</region_cap>",
            "<region_to_desciption>",
            "</region_to_desciption>",
            "<proposal>",
            "</proposal>",
            "<poly>",
            "</poly>",
            "<and>",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    t
}

/// The BART tokenizer of a checkpoint, with Florence's special tokens.
pub struct FlorenceTokenizer {
    tok: Tokenizer,
    bos: u32,
    eos: u32,
}

fn tok_err(path: &Path, e: impl std::fmt::Display) -> Florence2Error {
    Florence2Error::Tokenizer(format!("{}: {e}", path.display()))
}

impl FlorenceTokenizer {
    /// Loads `tokenizer.json` from `dir` and adds the Florence tokens when the file lacks them
    /// (original checkpoints ship a plain BART tokenizer).
    pub fn from_dir(dir: &Path) -> Result<Self, Florence2Error> {
        let path = dir.join("tokenizer.json");
        let tok = Tokenizer::from_file(&path).map_err(|e| tok_err(&path, e))?;
        Self::new(tok).map_err(|e| tok_err(&path, e))
    }

    pub fn new(mut tok: Tokenizer) -> Result<Self, String> {
        if tok.token_to_id("<od>").is_none() {
            let added: Vec<AddedToken> = florence_special_tokens()
                .into_iter()
                .map(|t| AddedToken::from(t, true).normalized(false))
                .collect();
            tok.add_special_tokens(added)
                .map_err(|e| format!("adding the Florence tokens: {e}"))?;
        }
        let id = |t: &str| {
            tok.token_to_id(t)
                .ok_or_else(|| format!("tokenizer has no {t} token"))
        };
        let bos = id("<s>")?;
        let eos = id("</s>")?;
        Ok(Self { tok, bos, eos })
    }

    /// Encoder prompt ids: `<s>` + prompt + `</s>`.
    pub fn prompt_ids(&self, task: Task) -> Result<Vec<u32>, Florence2Error> {
        let enc = self
            .tok
            .encode(task.prompt(), false)
            .map_err(|e| Florence2Error::Tokenizer(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.get_ids().len() + 2);
        ids.push(self.bos);
        ids.extend_from_slice(enc.get_ids());
        ids.push(self.eos);
        Ok(ids)
    }

    /// Decodes generated ids keeping special tokens (`batch_decode(..., skip_special_tokens=False)`).
    pub fn decode(&self, ids: &[u32]) -> Result<String, Florence2Error> {
        self.tok
            .decode(ids, false)
            .map_err(|e| Florence2Error::Tokenizer(e.to_string()))
    }

    /// Caption text of generated ids: decoded, `<s>`/`</s>` removed, trimmed (`pure_text` tasks).
    pub fn caption_text(&self, ids: &[u32]) -> Result<String, Florence2Error> {
        Ok(self
            .decode(ids)?
            .replace("<s>", "")
            .replace("</s>", "")
            .trim()
            .to_string())
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tok.token_to_id(token)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.tok.get_vocab_size(true)
    }
}

// ----------------------------------------------------------------------------------------------
// Pillow-compatible bicubic resampling

const PRECISION_BITS: u32 = 32 - 8 - 2;

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output pixel: first input index, tap count, and fixed-point weights (`ksize` each).
struct Coeffs {
    bounds: Vec<(usize, usize)>,
    kk: Vec<i32>,
    ksize: usize,
}

fn precompute_coeffs(in_size: usize, out_size: usize) -> Coeffs {
    const SUPPORT: f64 = 2.0;
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = SUPPORT * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut kk = vec![0i32; out_size * ksize];
    let ss = 1.0 / filterscale;
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        // C casts truncate toward zero
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin);
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let w = bicubic((x as f64 + xmin as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        for (x, kx) in k.iter().enumerate().take(n) {
            let w = if ww != 0.0 { kx / ww } else { *kx };
            let f = w * (1u32 << PRECISION_BITS) as f64;
            kk[xx * ksize + x] = if w < 0.0 {
                (f - 0.5) as i32
            } else {
                (f + 0.5) as i32
            };
        }
        bounds.push((xmin, n));
    }
    Coeffs { bounds, kk, ksize }
}

fn clip8(v: i64) -> u8 {
    if v >= (1i64 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// Resizes an RGB image like `PIL.Image.resize((width, height), Image.BICUBIC)`.
pub fn resize_bicubic(img: &RgbImage, width: usize, height: usize) -> RgbImage {
    let (w0, h0) = (img.width() as usize, img.height() as usize);
    if (w0, h0) == (width, height) {
        return img.clone();
    }
    let src = img.as_raw();
    let horiz = precompute_coeffs(w0, width);
    let vert = precompute_coeffs(h0, height);
    let need_h = w0 != width;
    let need_v = h0 != height;
    let half = 1i64 << (PRECISION_BITS - 1);

    // Horizontal pass over the rows the vertical pass needs.
    let (ybox_first, ybox_last) = if need_v {
        let (first, _) = vert.bounds[0];
        let (lf, ln) = vert.bounds[height - 1];
        (first, lf + ln)
    } else {
        (0, h0)
    };
    let (tmp, tmp_w, tmp_h, row0) = if need_h {
        let th = ybox_last - ybox_first;
        let mut out = vec![0u8; width * th * 3];
        for yy in 0..th {
            let srow = &src[(yy + ybox_first) * w0 * 3..][..w0 * 3];
            for xx in 0..width {
                let (xmin, n) = horiz.bounds[xx];
                let k = &horiz.kk[xx * horiz.ksize..][..n];
                let mut ss = [half; 3];
                for (x, &kx) in k.iter().enumerate() {
                    let p = &srow[(x + xmin) * 3..][..3];
                    for c in 0..3 {
                        ss[c] += p[c] as i64 * kx as i64;
                    }
                }
                let o = &mut out[(yy * width + xx) * 3..][..3];
                for c in 0..3 {
                    o[c] = clip8(ss[c]);
                }
            }
        }
        (out, width, th, ybox_first)
    } else {
        (src.to_vec(), w0, h0, 0)
    };
    if !need_v {
        return RgbImage::from_raw(tmp_w as u32, tmp_h as u32, tmp).unwrap_or_else(|| img.clone());
    }
    let mut out = vec![0u8; tmp_w * height * 3];
    for yy in 0..height {
        let (ymin, n) = vert.bounds[yy];
        let ymin = ymin - row0;
        let k = &vert.kk[yy * vert.ksize..][..n];
        for xx in 0..tmp_w {
            let mut ss = [half; 3];
            for (y, &ky) in k.iter().enumerate() {
                let p = &tmp[((y + ymin) * tmp_w + xx) * 3..][..3];
                for c in 0..3 {
                    ss[c] += p[c] as i64 * ky as i64;
                }
            }
            let o = &mut out[(yy * tmp_w + xx) * 3..][..3];
            for c in 0..3 {
                o[c] = clip8(ss[c]);
            }
        }
    }
    RgbImage::from_raw(tmp_w as u32, height as u32, out).unwrap_or_else(|| img.clone())
}

/// Image → pixel values `[1, 3, H, W]` (f32) on `device`.
pub fn preprocess(
    img: &RgbImage,
    cfg: &ImageProcessorConfig,
    device: &Device,
) -> Result<Tensor, Florence2Error> {
    if img.width() == 0 || img.height() == 0 {
        return Err(Florence2Error::Input("empty image".into()));
    }
    let resized;
    let img = if cfg.do_resize {
        resized = resize_bicubic(img, cfg.width, cfg.height);
        &resized
    } else {
        img
    };
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut data = vec![0f32; 3 * h * w];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            let mut v = if cfg.do_rescale {
                (p.0[c] as f64 * cfg.rescale_factor) as f32
            } else {
                p.0[c] as f32
            };
            if cfg.do_normalize {
                v = (v - cfg.image_mean[c]) / cfg.image_std[c];
            }
            data[c * h * w + i] = v;
        }
    }
    Ok(Tensor::from_vec(data, (1, 3, h, w), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_names_parse() {
        assert_eq!(
            "<DETAILED_CAPTION>".parse::<Task>().unwrap(),
            Task::DetailedCaption
        );
        assert_eq!("caption".parse::<Task>().unwrap(), Task::Caption);
        assert_eq!(
            "MORE_DETAILED_CAPTION".parse::<Task>().unwrap(),
            Task::MoreDetailedCaption
        );
        assert!("<OD>".parse::<Task>().is_err());
    }

    #[test]
    fn florence_tokens_count_matches_base_vocab() {
        // 50265 BART tokens + these = 51289, Florence-2-base's vocabulary.
        let t = florence_special_tokens();
        assert_eq!(t.len(), 51289 - 50265);
        assert_eq!(t[4], "<loc_0>");
        assert_eq!(t.last().map(String::as_str), Some("<and>"));
    }

    #[test]
    fn resize_identity_and_constant_images() {
        let img = RgbImage::from_fn(7, 5, |x, y| image::Rgb([x as u8 * 30, y as u8 * 40, 200]));
        assert_eq!(resize_bicubic(&img, 7, 5), img);
        let flat = RgbImage::from_pixel(37, 23, image::Rgb([17, 128, 250]));
        for (w, h) in [(12, 12), (80, 50), (37, 9)] {
            let r = resize_bicubic(&flat, w, h);
            assert_eq!((r.width(), r.height()), (w as u32, h as u32));
            assert!(r.pixels().all(|p| p.0 == [17, 128, 250]), "{w}x{h}");
        }
    }

    #[test]
    fn preprocess_normalises_channels_first() {
        let img = RgbImage::from_pixel(4, 4, image::Rgb([255, 0, 128]));
        let cfg = ImageProcessorConfig {
            height: 2,
            width: 3,
            ..Default::default()
        };
        let t = preprocess(&img, &cfg, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[1, 3, 2, 3]);
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!((v[0] - (1.0 - 0.485) / 0.229).abs() < 1e-6);
        assert!((v[6] - (0.0 - 0.456) / 0.224).abs() < 1e-6);
    }
}

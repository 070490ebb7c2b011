//! CPU cost of the pipeline stages around the model (decode, mask cleanup, crop planning, crop
//! preparation, stitch, encode) on the example photo and on a synthetic 12 MP photo with a
//! leash across it.
//!
//! ```sh
//! cargo run --release -p pawfect-worker --example stage_bench [-- RUNS]
//! ```
//!
//! The model stages (encode, denoise, decode) are measured by the models' own benches.

use std::time::Instant;

use image::{GrayImage, Luma, RgbImage};
use pawfect_worker::pipeline::store::{self, OutputFormat};
use pawfect_worker::pipeline::{
    CropConfig, InputLimits, MaskConfig, crop, fetch, inpaint, mask, stitch,
};

fn synthetic(w: u32, h: u32) -> (Vec<u8>, Vec<u8>) {
    let photo = RgbImage::from_fn(w, h, |x, y| {
        let v = ((x * 31 + y * 17) ^ (x * y)) as u8;
        image::Rgb([v / 3 + 40, v / 2 + 90, v / 4 + 30])
    });
    let mut m = GrayImage::new(w, h);
    // A leash from the top-left corner to the middle, 14 px wide, sagging.
    let (x0, y0, x1, y1) = (0.02 * w as f32, 0.0, 0.62 * w as f32, 0.55 * h as f32);
    for i in 0..4000 {
        let t = i as f32 / 3999.0;
        let x = x0 + (x1 - x0) * t;
        let y = y0 + (y1 - y0) * t + 0.25 * h as f32 * (std::f32::consts::PI * t).sin();
        for dy in -7i32..=7 {
            for dx in -7i32..=7 {
                let (px, py) = (x as i32 + dx, y as i32 + dy);
                if px >= 0 && py >= 0 && (px as u32) < w && (py as u32) < h {
                    m.put_pixel(px as u32, py as u32, Luma([255]));
                }
            }
        }
    }
    let photo = store::encode(&photo, OutputFormat::Jpeg).expect("encode");
    let mut mask = Vec::new();
    image::ImageEncoder::write_image(
        image::codecs::png::PngEncoder::new(&mut mask),
        m.as_raw(),
        w,
        h,
        image::ExtendedColorType::L8,
    )
    .expect("encode mask");
    (photo, mask)
}

fn main() {
    let runs: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/photo/");
    let example = (
        std::fs::read(format!("{root}dog-on-lawn.jpg")).expect("examples/photo/dog-on-lawn.jpg"),
        std::fs::read(format!("{root}leash-mask.png")).expect("examples/photo/leash-mask.png"),
    );
    let cases = [
        ("example 1024x768", example),
        ("synthetic 4000x3000", synthetic(4000, 3000)),
    ];
    println!(
        "| photo | crops | decode | mask | crop plan | crop prep | stitch | encode PNG | (ms, median of {runs}) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (name, (photo_bytes, mask_bytes)) in cases {
        let mut t: [Vec<f64>; 6] = Default::default();
        let mut n_crops = 0;
        for _ in 0..runs {
            let limits = InputLimits::default();
            let s = Instant::now();
            let photo = fetch::decode_image(&photo_bytes, &limits).expect("decode");
            let (w, h) = photo.dimensions();
            let m = fetch::decode_mask(&mask_bytes, &limits, w, h).expect("mask");
            t[0].push(s.elapsed().as_secs_f64() * 1e3);

            let s = Instant::now();
            let clean = mask::clean(&m, &MaskConfig::default()).expect("clean");
            t[1].push(s.elapsed().as_secs_f64() * 1e3);

            let s = Instant::now();
            let cfg = CropConfig::default();
            let crops = crop::plan(&clean.dilated, clean.bbox, &cfg);
            t[2].push(s.elapsed().as_secs_f64() * 1e3);
            n_crops = crops.len();

            let mut composite = photo.clone();
            let (mut prep, mut paste) = (0.0, 0.0);
            for c in &crops {
                let s = Instant::now();
                let (input, _m) = inpaint::model_input(&composite, &clean.dilated, c);
                prep += s.elapsed().as_secs_f64() * 1e3;
                // Stand-in for the model output: the input itself, brightened.
                let mut out = input;
                for p in out.pixels_mut() {
                    p.0[1] = p.0[1].saturating_add(40);
                }
                let s = Instant::now();
                let patch = inpaint::region_output(out, c);
                stitch::paste(
                    &mut composite,
                    &patch,
                    c,
                    &clean.dilated,
                    clean.radius,
                    cfg.blend_px,
                );
                paste += s.elapsed().as_secs_f64() * 1e3;
            }
            t[3].push(prep);
            t[4].push(paste);

            let s = Instant::now();
            let bytes = store::encode(&composite, OutputFormat::Png).expect("png");
            t[5].push(s.elapsed().as_secs_f64() * 1e3);
            std::hint::black_box(bytes);
        }
        let med = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let cells: Vec<String> = t.iter_mut().map(|v| format!("{:.1}", med(v))).collect();
        println!("| {name} | {n_crops} | {} | |", cells.join(" | "));
    }
}

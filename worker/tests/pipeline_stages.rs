//! Table tests of the pipeline stages on synthetic images: fetch/decode, mask cleanup, crop
//! geometry, stitch and store.

mod common;

use image::{GrayImage, ImageEncoder, Luma, Rgb, RgbImage};
use pawfect_worker::pipeline::crop::{self, Crop, CropConfig};
use pawfect_worker::pipeline::fetch::{self, DecodeError, InputLimits, MaskSizePolicy};
use pawfect_worker::pipeline::mask::{self, MaskConfig, MaskError};
use pawfect_worker::pipeline::stitch;
use pawfect_worker::pipeline::store::{self, OutputFormat};
use pawfect_worker::pipeline::{Rect, mask::count_white};

use common::jobs::{png_claiming, png_gray};

// ---------------------------------------------------------------- helpers

/// Deterministic noise (xorshift), so tests need no RNG crate.
struct Noise(u64);
impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn noise_photo(w: u32, h: u32, seed: u64) -> RgbImage {
    let mut n = Noise(seed | 1);
    RgbImage::from_fn(w, h, |_, _| {
        let v = n.next();
        Rgb([v as u8, (v >> 8) as u8, (v >> 16) as u8])
    })
}

fn draw_rect(m: &mut GrayImage, x: u32, y: u32, w: u32, h: u32, v: u8) {
    for yy in y..(y + h).min(m.height()) {
        for xx in x..(x + w).min(m.width()) {
            m.put_pixel(xx, yy, Luma([v]));
        }
    }
}

/// A line `width` px thick from (x0, y0) to (x1, y1).
fn draw_line(m: &mut GrayImage, (x0, y0): (f32, f32), (x1, y1): (f32, f32), width: f32) {
    let len = ((x1 - x0).powi(2) + (y1 - y0).powi(2)).sqrt();
    for y in 0..m.height() {
        for x in 0..m.width() {
            let (px, py) = (x as f32 + 0.5, y as f32 + 0.5);
            let t = (((px - x0) * (x1 - x0) + (py - y0) * (y1 - y0)) / (len * len)).clamp(0.0, 1.0);
            let (cx, cy) = (x0 + t * (x1 - x0), y0 + t * (y1 - y0));
            if ((px - cx).powi(2) + (py - cy).powi(2)).sqrt() <= width / 2.0 {
                m.put_pixel(x, y, Luma([255]));
            }
        }
    }
}

fn encode_png_rgb(img: &RgbImage) -> Vec<u8> {
    store::encode(img, OutputFormat::Png).unwrap()
}

/// A minimal big-endian TIFF block with one Orientation (0x0112) entry.
fn exif_orientation(value: u16) -> Vec<u8> {
    let mut e = b"MM\x00\x2a\x00\x00\x00\x08".to_vec();
    e.extend_from_slice(&1u16.to_be_bytes()); // one entry
    e.extend_from_slice(&0x0112u16.to_be_bytes());
    e.extend_from_slice(&3u16.to_be_bytes()); // SHORT
    e.extend_from_slice(&1u32.to_be_bytes()); // count
    e.extend_from_slice(&value.to_be_bytes());
    e.extend_from_slice(&[0, 0]);
    e.extend_from_slice(&0u32.to_be_bytes()); // no next IFD
    e
}

// ---------------------------------------------------------------- fetch

#[test]
fn decodes_png_jpeg_webp() {
    let photo = noise_photo(48, 32, 7);
    let limits = InputLimits::default();
    for format in [OutputFormat::Png, OutputFormat::Jpeg, OutputFormat::WebP] {
        let bytes = store::encode(&photo, format).unwrap();
        let got = fetch::decode_image(&bytes, &limits).unwrap();
        assert_eq!(got.dimensions(), (48, 32), "{format:?}");
        if format != OutputFormat::Jpeg {
            assert_eq!(got, photo, "{format:?} is lossless");
        }
    }
}

#[test]
fn applies_exif_orientation() {
    // 40×20, left half red, right half blue; orientation 6 = rotate 90° clockwise to view.
    let img = RgbImage::from_fn(40, 20, |x, _| {
        if x < 20 {
            Rgb([255, 0, 0])
        } else {
            Rgb([0, 0, 255])
        }
    });
    let mut bytes = Vec::new();
    let mut enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 95);
    enc.set_exif_metadata(exif_orientation(6)).unwrap();
    enc.write_image(img.as_raw(), 40, 20, image::ExtendedColorType::Rgb8)
        .unwrap();
    let got = fetch::decode_image(&bytes, &InputLimits::default()).unwrap();
    assert_eq!(got.dimensions(), (20, 40), "rotated upright");
    // After a clockwise quarter turn the left (red) half is on top.
    let top = got.get_pixel(10, 5);
    let bottom = got.get_pixel(10, 35);
    assert!(top.0[0] > 200 && top.0[2] < 60, "top is red: {top:?}");
    assert!(
        bottom.0[2] > 200 && bottom.0[0] < 60,
        "bottom is blue: {bottom:?}"
    );
}

#[test]
fn bad_images_are_refused_with_reasons() {
    let limits = InputLimits {
        max_pixels: 1_000_000,
        ..InputLimits::default()
    };
    let png = encode_png_rgb(&noise_photo(64, 64, 3));
    let jpeg = store::encode(&noise_photo(64, 64, 3), OutputFormat::Jpeg).unwrap();
    let webp = store::encode(&noise_photo(64, 64, 3), OutputFormat::WebP).unwrap();
    let gif = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;".to_vec();
    type Check = fn(&DecodeError) -> bool;
    let cases: Vec<(&str, Vec<u8>, Check)> = vec![
        ("text", b"hello, not an image".to_vec(), |e| {
            *e == DecodeError::NotAnImage
        }),
        ("empty", Vec::new(), |e| *e == DecodeError::NotAnImage),
        (
            "gif",
            gif,
            |e| matches!(e, DecodeError::UnsupportedFormat(f) if f == "GIF"),
        ),
        (
            "truncated png",
            png[..png.len() / 2].to_vec(),
            |e| matches!(e, DecodeError::Corrupt { format, .. } if format == "PNG"),
        ),
        ("png header only", png[..40].to_vec(), |e| {
            matches!(e, DecodeError::Corrupt { .. })
        }),
        (
            "truncated jpeg",
            jpeg[..jpeg.len() / 3].to_vec(),
            |e| matches!(e, DecodeError::Corrupt { format, .. } if format == "JPEG"),
        ),
        (
            "jpeg without its end marker",
            jpeg[..jpeg.len() - 2].to_vec(),
            |e| matches!(e, DecodeError::Corrupt { format, .. } if format == "JPEG"),
        ),
        (
            "truncated webp",
            webp[..webp.len() / 2].to_vec(),
            |e| matches!(e, DecodeError::Corrupt { format, .. } if format == "WEBP"),
        ),
        ("1x1", encode_png_rgb(&RgbImage::new(1, 1)), |e| {
            matches!(
                e,
                DecodeError::TooSmall {
                    width: 1,
                    height: 1,
                    ..
                }
            )
        }),
        ("bomb", png_claiming(100_000, 100_000), |e| {
            matches!(
                e,
                DecodeError::TooLarge {
                    pixels: 10_000_000_000,
                    ..
                }
            )
        }),
        ("over limit", png_claiming(1001, 1000), |e| {
            matches!(e, DecodeError::TooLarge { .. })
        }),
    ];
    for (name, bytes, check) in cases {
        match fetch::decode_image(&bytes, &limits) {
            Err(e) => assert!(check(&e), "{name}: unexpected error {e}"),
            Ok(img) => panic!("{name}: decoded {:?}", img.dimensions()),
        }
    }
}

#[test]
fn mask_size_policy() {
    let mask = png_gray(&GrayImage::from_pixel(50, 25, Luma([255])));
    let resize = InputLimits::default();
    let reject = InputLimits {
        mask_policy: MaskSizePolicy::Reject,
        ..InputLimits::default()
    };
    // Same size: accepted under both policies.
    assert_eq!(
        fetch::decode_mask(&mask, &reject, 50, 25)
            .unwrap()
            .dimensions(),
        (50, 25)
    );
    // Same aspect ratio: resized, or refused.
    assert_eq!(
        fetch::decode_mask(&mask, &resize, 100, 50)
            .unwrap()
            .dimensions(),
        (100, 50)
    );
    assert!(matches!(
        fetch::decode_mask(&mask, &reject, 100, 50),
        Err(DecodeError::MaskSize { .. })
    ));
    // Different aspect ratio: refused under both.
    for limits in [&resize, &reject] {
        let e = fetch::decode_mask(&mask, limits, 100, 100).unwrap_err();
        assert!(matches!(e, DecodeError::MaskSize { .. }), "{e}");
        assert!(e.to_string().contains("50×25"), "{e}");
    }
}

// ---------------------------------------------------------------- mask

fn cfg(dilate: u8) -> MaskConfig {
    MaskConfig {
        dilate_px: Some(dilate),
        ..MaskConfig::default()
    }
}

#[test]
fn mask_cleanup_table() {
    struct Case {
        name: &'static str,
        draw: fn(&mut GrayImage),
        /// Pixels that must be in the cleaned mask.
        keep: fn(&mut GrayImage),
        removed: u64,
    }
    let cases = [
        Case {
            name: "specks removed, blob kept",
            draw: |m| {
                draw_rect(m, 60, 60, 40, 40, 255);
                for (x, y) in [(10, 10), (150, 20), (30, 170), (180, 180)] {
                    m.put_pixel(x, y, Luma([255]));
                }
                draw_rect(m, 100, 10, 2, 2, 255);
                draw_rect(m, 10, 100, 3, 3, 255);
            },
            keep: |m| draw_rect(m, 60, 60, 40, 40, 255),
            removed: 4 + 4 + 9,
        },
        Case {
            name: "1-px leash kept",
            draw: |m| {
                draw_line(m, (20.0, 20.0), (180.0, 150.0), 1.0);
            },
            keep: |m| draw_line(m, (20.0, 20.0), (180.0, 150.0), 1.0),
            removed: 0,
        },
        Case {
            name: "3-px leash kept, specks removed",
            draw: |m| {
                draw_line(m, (5.0, 190.0), (190.0, 40.0), 3.0);
                for (x, y) in [(10, 10), (150, 20)] {
                    m.put_pixel(x, y, Luma([255]));
                }
            },
            keep: |m| draw_line(m, (5.0, 190.0), (190.0, 40.0), 3.0),
            removed: 2,
        },
        Case {
            name: "leash running off the frame kept",
            draw: |m| draw_line(m, (-10.0, 5.0), (210.0, 120.0), 3.0),
            keep: |m| draw_line(m, (-10.0, 5.0), (210.0, 120.0), 3.0),
            removed: 0,
        },
        Case {
            name: "small but thick dot kept",
            draw: |m| draw_rect(m, 90, 90, 6, 6, 255),
            keep: |m| draw_rect(m, 90, 90, 6, 6, 255),
            removed: 0,
        },
        Case {
            name: "grey below threshold ignored",
            draw: |m| {
                draw_rect(m, 20, 20, 30, 30, 200);
                draw_rect(m, 120, 120, 30, 30, 100);
            },
            keep: |m| draw_rect(m, 20, 20, 30, 30, 255),
            removed: 0,
        },
    ];
    for case in cases {
        let mut m = GrayImage::new(200, 200);
        (case.draw)(&mut m);
        let mut want = GrayImage::new(200, 200);
        (case.keep)(&mut want);
        let clean = mask::clean(&m, &cfg(4)).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        assert_eq!(clean.core, want, "{}: cleaned mask", case.name);
        assert_eq!(clean.specks_removed, case.removed, "{}: specks", case.name);
        // The dilation covers the core and stays within the radius of it.
        for (x, y, p) in clean.dilated.enumerate_pixels() {
            if clean.core.get_pixel(x, y).0[0] > 0 {
                assert_eq!(p.0[0], 255, "{}: core inside dilation", case.name);
            }
        }
        assert!(
            count_white(&clean.dilated) > count_white(&clean.core),
            "{}",
            case.name
        );
        let bbox = Rect::bounding(&clean.dilated).unwrap();
        assert_eq!(bbox, clean.bbox, "{}", case.name);
        let core_box = Rect::bounding(&clean.core).unwrap();
        assert!(bbox.contains(&core_box));
        assert!(
            bbox.x + 4 >= core_box.x && bbox.right() <= core_box.right() + 4,
            "{}",
            case.name
        );
    }
}

#[test]
fn mask_refusals() {
    let empty = GrayImage::new(64, 64);
    assert_eq!(
        mask::clean(&empty, &cfg(4)).unwrap_err(),
        MaskError::Empty { threshold: 128 }
    );
    let grey = GrayImage::from_pixel(64, 64, Luma([100]));
    assert!(matches!(
        mask::clean(&grey, &cfg(4)),
        Err(MaskError::Empty { .. })
    ));
    let mut specks = GrayImage::new(64, 64);
    for (x, y) in [(3, 3), (40, 9), (20, 50)] {
        specks.put_pixel(x, y, Luma([255]));
    }
    assert_eq!(
        mask::clean(&specks, &cfg(4)).unwrap_err(),
        MaskError::OnlySpecks {
            pixels: 3,
            min_component_px: 64
        }
    );
    let white = GrayImage::from_pixel(64, 64, Luma([255]));
    assert!(matches!(
        mask::clean(&white, &cfg(4)),
        Err(MaskError::CoversImage { coverage, .. }) if coverage == 1.0
    ));
    // Almost all: the dilation reaches the whole frame.
    let mut most = GrayImage::from_pixel(64, 64, Luma([255]));
    draw_rect(&mut most, 0, 0, 64, 3, 0);
    assert!(matches!(
        mask::clean(&most, &cfg(4)),
        Err(MaskError::CoversImage { .. })
    ));
}

#[test]
fn dilation_radius_scales_with_the_image() {
    let c = MaskConfig::default();
    assert_eq!(c.dilate_radius(200, 100), 4);
    assert_eq!(c.dilate_radius(1024, 768), 8);
    assert_eq!(c.dilate_radius(3000, 4000), 31);
    assert_eq!(c.dilate_radius(12000, 3000), 48);
    assert_eq!(cfg(3).dilate_radius(4000, 4000), 3);
}

// ---------------------------------------------------------------- crop

fn check_crop(c: &Crop, w: u32, h: u32, config: &CropConfig, name: &str) {
    let (tw, th) = c.target;
    assert!(
        tw % 16 == 0 && th % 16 == 0,
        "{name}: target {tw}×{th} not multiples of 16"
    );
    let long = tw.max(th);
    assert!(
        (config.min_side..=config.max_side).contains(&long),
        "{name}: target long side {long}"
    );
    assert!(
        c.region.right() <= w && c.region.bottom() <= h,
        "{name}: region {:?} outside {w}×{h}",
        c.region
    );
    assert!(
        c.region.contains(&c.cell),
        "{name}: region {:?} misses cell {:?}",
        c.region,
        c.cell
    );
    // Context: twice the box, where the photo is large enough (a native crop may give up
    // less than 16 px of it to snap to a multiple of 16).
    assert!(
        c.region.w + 15 >= (2 * c.cell.w).min(w),
        "{name}: context x"
    );
    assert!(
        c.region.h + 15 >= (2 * c.cell.h).min(h),
        "{name}: context y"
    );
    // Aspect ratio of the model input follows the region's (within the 16-px snap).
    let ra = c.region.w as f64 / c.region.h as f64;
    let ta = tw as f64 / th as f64;
    assert!((ra / ta - 1.0).abs() < 0.1, "{name}: aspect {ra} vs {ta}");
}

#[test]
fn crop_geometry_table() {
    let config = CropConfig::default();
    // (name, photo size, mask box, expected region, expected target)
    #[allow(clippy::type_complexity)]
    let cases: &[(&str, (u32, u32), Rect, Option<Rect>, Option<(u32, u32)>)] = &[
        (
            "small mask, native 512",
            (1024, 768),
            Rect::new(500, 380, 40, 40),
            Some(Rect::new(264, 144, 512, 512)),
            Some((512, 512)),
        ),
        (
            "top-left corner",
            (1024, 768),
            Rect::new(0, 0, 50, 50),
            Some(Rect::new(0, 0, 512, 512)),
            Some((512, 512)),
        ),
        (
            "bottom-right corner",
            (1000, 700),
            Rect::new(950, 650, 50, 50),
            Some(Rect::new(488, 188, 512, 512)),
            Some((512, 512)),
        ),
        (
            "medium mask, native, snapped",
            (2000, 1500),
            Rect::new(800, 600, 300, 250),
            None,
            Some((608, 512)),
        ),
        (
            "large mask, downscaled",
            (4000, 3000),
            Rect::new(1500, 1000, 1000, 800),
            Some(Rect::new(1000, 600, 2000, 1600)),
            Some((1024, 816)),
        ),
        (
            "whole small photo, upscaled",
            (300, 200),
            Rect::new(100, 50, 100, 100),
            Some(Rect::new(0, 0, 300, 200)),
            Some((512, 336)),
        ),
        (
            "tiny photo",
            (16, 16),
            Rect::new(4, 4, 8, 8),
            Some(Rect::new(0, 0, 16, 16)),
            Some((512, 512)),
        ),
        (
            "wide thin mask, aspect capped",
            (4000, 3000),
            Rect::new(1000, 1500, 800, 20),
            None,
            None,
        ),
        (
            "tall photo",
            (768, 2048),
            Rect::new(300, 900, 100, 400),
            None,
            None,
        ),
        (
            "photo sides not multiples of 16",
            (1000, 600),
            Rect::new(10, 10, 900, 500),
            Some(Rect::new(0, 0, 992, 592)),
            Some((992, 592)),
        ),
    ];
    for (name, (w, h), cell, region, target) in cases {
        let c = crop::crop_for(*cell, *w, *h, &config);
        check_crop(&c, *w, *h, &config, name);
        if let Some(r) = region {
            assert_eq!(c.region, *r, "{name}: region");
        }
        if let Some(t) = target {
            assert_eq!(c.target, *t, "{name}: target");
        }
        let long = c.region.w.max(c.region.h);
        if (512..=1024).contains(&long)
            && c.region.w.is_multiple_of(16)
            && c.region.h.is_multiple_of(16)
        {
            assert!(c.is_native(), "{name}: should be native: {c:?}");
        }
        let ratio = c.region.w.max(c.region.h) as f64 / c.region.w.min(c.region.h) as f64;
        if *w >= 1024 && *h >= 1024 {
            assert!(ratio <= 2.0 + 1e-9, "{name}: aspect {ratio}");
        }
    }
}

#[test]
fn thin_leash_over_the_frame_is_split() {
    let (w, h) = (3000u32, 2000u32);
    let mut m = GrayImage::new(w, h);
    draw_line(&mut m, (100.0, 1900.0), (2900.0, 150.0), 24.0);
    let bbox = Rect::bounding(&m).unwrap();
    let config = CropConfig::default();
    let single = crop::crop_for(bbox, w, h, &config);
    assert!(
        single.scale() < 0.5,
        "one crop would be scaled down: {single:?}"
    );
    let crops = crop::plan(&m, bbox, &config);
    assert!(
        crops.len() > 1 && crops.len() <= config.max_crops,
        "{} crops",
        crops.len()
    );
    for (i, c) in crops.iter().enumerate() {
        check_crop(c, w, h, &config, &format!("crop {i}"));
        assert!(
            c.scale() > single.scale(),
            "crop {i} keeps more detail: {c:?}"
        );
        for d in &crops[i + 1..] {
            let overlap_w = c
                .cell
                .right()
                .min(d.cell.right())
                .saturating_sub(c.cell.x.max(d.cell.x));
            let overlap_h = c
                .cell
                .bottom()
                .min(d.cell.bottom())
                .saturating_sub(c.cell.y.max(d.cell.y));
            assert!(overlap_w == 0 || overlap_h == 0, "cells are disjoint");
        }
    }
    // Every mask pixel belongs to a cell.
    for (x, y, p) in m.enumerate_pixels() {
        if p.0[0] > 0 {
            let cell = Rect::new(x, y, 1, 1);
            assert!(
                crops.iter().any(|c| c.cell.contains(&cell)),
                "({x}, {y}) in no cell"
            );
        }
    }
}

#[test]
fn blob_is_not_split() {
    let (w, h) = (3000u32, 2000u32);
    let mut m = GrayImage::new(w, h);
    draw_rect(&mut m, 800, 400, 1200, 1000, 255);
    let bbox = Rect::bounding(&m).unwrap();
    let crops = crop::plan(&m, bbox, &CropConfig::default());
    assert_eq!(crops.len(), 1, "a filled box is one (downscaled) crop");
    assert!(crops[0].scale() < 1.0);
    // A small mask is one native crop.
    let mut m = GrayImage::new(w, h);
    draw_line(&mut m, (100.0, 100.0), (300.0, 250.0), 10.0);
    let crops = crop::plan(&m, Rect::bounding(&m).unwrap(), &CropConfig::default());
    assert_eq!(crops.len(), 1);
    assert!(crops[0].is_native());
}

// ---------------------------------------------------------------- stitch

fn stitch_case(
    photo: &RgbImage,
    m: &GrayImage,
    config: &CropConfig,
) -> (RgbImage, RgbImage, mask::CleanMask) {
    let clean = mask::clean(m, &cfg(6)).unwrap();
    let crops = crop::plan(&clean.dilated, clean.bbox, config);
    let fill = Rgb([10, 200, 30]);
    let mut out = photo.clone();
    for c in &crops {
        let patch = RgbImage::from_pixel(c.region.w, c.region.h, fill);
        stitch::paste(
            &mut out,
            &patch,
            c,
            &clean.dilated,
            clean.radius,
            config.blend_px,
        );
    }
    (out, RgbImage::from_pixel(1, 1, fill), clean)
}

#[test]
fn stitch_keeps_outside_bytes_and_feathers_inside() {
    let photo = noise_photo(320, 240, 11);
    let mut m = GrayImage::new(320, 240);
    draw_line(&mut m, (30.0, 200.0), (290.0, 40.0), 5.0);
    draw_rect(&mut m, 140, 100, 30, 30, 255);
    let config = CropConfig::default();
    let (out, fill, clean) = stitch_case(&photo, &m, &config);
    let fill = *fill.get_pixel(0, 0);
    let (mut outside, mut core, mut ring_blended, mut ring) = (0, 0, 0, 0);
    for (x, y, p) in out.enumerate_pixels() {
        let orig = photo.get_pixel(x, y);
        if clean.dilated.get_pixel(x, y).0[0] == 0 {
            assert_eq!(p, orig, "({x}, {y}) outside the dilated mask changed");
            outside += 1;
        } else if clean.core.get_pixel(x, y).0[0] > 0 {
            assert_eq!(*p, fill, "({x}, {y}) on the mask is the model's output");
            core += 1;
        } else {
            ring += 1;
            for c in 0..3 {
                let (lo, hi) = (orig.0[c].min(fill.0[c]), orig.0[c].max(fill.0[c]));
                assert!(
                    (lo..=hi).contains(&p.0[c]),
                    "({x}, {y}) ring pixel is a mix"
                );
            }
            if p != orig && *p != fill {
                ring_blended += 1;
            }
        }
    }
    assert!(outside > 0 && core > 0 && ring > 0);
    assert!(
        ring_blended * 2 > ring,
        "most of the ring is feathered: {ring_blended}/{ring}"
    );
}

#[test]
fn stitch_with_several_crops_keeps_outside_bytes() {
    let photo = noise_photo(1600, 1200, 5);
    let mut m = GrayImage::new(1600, 1200);
    draw_line(&mut m, (50.0, 1150.0), (1550.0, 60.0), 8.0);
    let config = CropConfig {
        min_side: 256,
        max_side: 512,
        ..CropConfig::default()
    };
    let (out, fill, clean) = stitch_case(&photo, &m, &config);
    let crops = crop::plan(&clean.dilated, clean.bbox, &config);
    assert!(crops.len() > 1);
    let fill = *fill.get_pixel(0, 0);
    for (x, y, p) in out.enumerate_pixels() {
        if clean.dilated.get_pixel(x, y).0[0] == 0 {
            assert_eq!(p, photo.get_pixel(x, y), "({x}, {y}) outside changed");
        } else if clean.core.get_pixel(x, y).0[0] > 0 {
            assert_eq!(*p, fill, "({x}, {y}) on the mask");
        }
    }
}

#[test]
fn feather_alpha_profile() {
    let mut d = GrayImage::new(41, 41);
    draw_rect(&mut d, 10, 10, 21, 21, 255);
    let region = Rect::new(0, 0, 41, 41);
    let a = stitch::feather(&d, region, 5.0);
    let at = |x: u32, y: u32| a[(y * 41 + x) as usize];
    assert_eq!(at(9, 20), 0.0, "outside");
    assert!((at(10, 20) - 0.2).abs() < 1e-6, "edge: 1 px from outside");
    assert!((at(12, 20) - 0.6).abs() < 1e-6);
    assert_eq!(at(15, 20), 1.0);
    assert_eq!(at(20, 20), 1.0);
    // Cell weights fade over the blend width.
    let cell = Rect::new(10, 10, 5, 5);
    assert_eq!(stitch::cell_weight(12, 12, cell, 8), 1.0);
    assert_eq!(stitch::cell_weight(18, 12, cell, 8), 0.5);
    assert_eq!(stitch::cell_weight(30, 12, cell, 8), 0.0);
}

// ---------------------------------------------------------------- store

#[test]
fn output_formats_by_extension() {
    let cases = [
        ("file:///out/a.png", Some(OutputFormat::Png)),
        ("s3://b/x/y.JPG", Some(OutputFormat::Jpeg)),
        ("gs://b/y.jpeg", Some(OutputFormat::Jpeg)),
        ("az://c/z.webp", Some(OutputFormat::WebP)),
        ("https://h/x.png?sig=abc.def", Some(OutputFormat::Png)),
        ("file:///out/a.gif", None),
        ("file:///out/noext", None),
        ("file:///out.d/noext", None),
    ];
    for (uri, want) in cases {
        assert_eq!(OutputFormat::from_uri(uri).ok(), want, "{uri}");
    }
    let img = noise_photo(20, 10, 1);
    for f in [OutputFormat::Png, OutputFormat::WebP] {
        let bytes = store::encode(&img, f).unwrap();
        assert_eq!(
            image::load_from_memory(&bytes).unwrap().to_rgb8(),
            img,
            "{f:?}"
        );
    }
}

//! Stage 3, crop: which parts of the photo the model sees, and at which size.
//!
//! For the bounding box of the (dilated) mask, the crop region is:
//! 1. the box grown by `context` times its size (1.0: twice the box, centred on it), and by
//!    `blend_px` on every side;
//! 2. at least `min_side` pixels per side where the photo allows it (more context rather than
//!    upscaling a tiny area);
//! 3. no more elongated than `max_aspect`;
//! 4. clamped to the photo, shifted (not shrunk) to stay inside it, always containing the box.
//!
//! The model input size is then a multiple of `multiple` (16 for FLUX: VAE ×8, 2×2 patches) with
//! the long side in `[min_side, max_side]`. When the region itself already fits (long side in
//! range, both sides multiples of 16 after growing by < 16 px) the crop is taken at native
//! resolution and nothing is resampled; otherwise the region is resized to the model size and the
//! result resized back.
//!
//! A thin mask spread over the frame (a leash from the hand to the collar) would need one region
//! covering most of the photo, scaled down so far that the leash is a few pixels wide. When the
//! single crop would be downscaled and the mask fills less than `split_below_fill` of its box,
//! the box is split in halves along its longer side, each half shrunk to the mask pixels it holds,
//! repeatedly (the most downscaled first) until every crop fits or `max_crops` is reached. The
//! halves (cells) are disjoint; each crop pastes its own cell fully and cross-fades over
//! `blend_px` into its neighbours (see `stitch`).

use image::GrayImage;

use super::Rect;

#[derive(Clone, Debug, PartialEq)]
pub struct CropConfig {
    /// Context around the mask box, as a multiple of the box size (1.0: region = 2× the box).
    pub context: f64,
    /// Shortest long side of the model input, and the side a region grows to for context.
    pub min_side: u32,
    /// Longest side of the model input.
    pub max_side: u32,
    /// Model input sides are multiples of this.
    pub multiple: u32,
    /// Longest-to-shortest side ratio of a region (where the photo allows).
    pub max_aspect: f64,
    /// Most crops per photo.
    pub max_crops: usize,
    /// Split a downscaled crop only when the mask fills less than this share of its box.
    pub split_below_fill: f64,
    /// Cross-fade width between neighbouring crops, in photo pixels.
    pub blend_px: u32,
}

impl Default for CropConfig {
    fn default() -> Self {
        CropConfig {
            context: 1.0,
            min_side: 512,
            max_side: 1024,
            multiple: 16,
            max_aspect: 2.0,
            max_crops: 4,
            split_below_fill: 0.25,
            blend_px: 32,
        }
    }
}

/// One model call: `region` of the photo, resized to `target`, pasting `cell`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Crop {
    /// Part of the photo the model sees (photo pixels).
    pub region: Rect,
    /// Model input size (width, height): multiples of 16.
    pub target: (u32, u32),
    /// Part of the mask this crop is responsible for (inside `region`).
    pub cell: Rect,
}

impl Crop {
    /// Model pixels per photo pixel along the long side (1.0: native).
    pub fn scale(&self) -> f64 {
        let long = self.region.w.max(self.region.h) as f64;
        self.target.0.max(self.target.1) as f64 / long
    }
    /// True when the region goes to the model without resampling.
    pub fn is_native(&self) -> bool {
        self.target == (self.region.w, self.region.h)
    }
}

/// The crop region and model size for one mask box (`cell`) in a `width`×`height` photo.
pub fn crop_for(cell: Rect, width: u32, height: u32, config: &CropConfig) -> Crop {
    let m = config.multiple.max(1);
    let grow = |side: u32, image: u32| -> u32 {
        let with_context = (side as f64 * (1.0 + config.context.max(0.0))).ceil() as u32;
        let with_blend = side.saturating_add(2 * config.blend_px);
        with_context.max(with_blend).max(config.min_side.min(image))
    };
    let mut w = grow(cell.w, width) as f64;
    let mut h = grow(cell.h, height) as f64;
    if config.max_aspect >= 1.0 {
        if w > h * config.max_aspect {
            h = w / config.max_aspect;
        } else if h > w * config.max_aspect {
            w = h / config.max_aspect;
        }
    }
    let mut w = (w.ceil() as u32).clamp(cell.w, width);
    let mut h = (h.ceil() as u32).clamp(cell.h, height);

    // Native resolution when the sides can be snapped to multiples of 16 inside the photo
    // and the long side is in range.
    let snap_native = |side: u32, image: u32, min: u32| -> Option<u32> {
        let up = side.div_ceil(m) * m;
        if up <= image {
            return Some(up);
        }
        let down = side / m * m;
        (down >= min && down > 0).then_some(down)
    };
    let target = match (
        snap_native(w, width, cell.w),
        snap_native(h, height, cell.h),
    ) {
        (Some(nw), Some(nh)) if (config.min_side..=config.max_side).contains(&nw.max(nh)) => {
            w = nw;
            h = nh;
            (nw, nh)
        }
        _ => {
            let long = w.max(h) as f64;
            let s = if long > config.max_side as f64 {
                config.max_side as f64 / long
            } else if long < config.min_side as f64 {
                config.min_side as f64 / long
            } else {
                1.0
            };
            let snap = |v: f64| -> u32 {
                (((v / m as f64).round() as u32).max(1) * m).min(snap_max(config))
            };
            (snap(w as f64 * s), snap(h as f64 * s))
        }
    };

    let place = |start: u32, side: u32, region: u32, image: u32| -> u32 {
        let centred = start as i64 - (region as i64 - side as i64) / 2;
        centred.clamp(0, (image - region) as i64) as u32
    };
    let region = Rect::new(
        place(cell.x, cell.w, w, width),
        place(cell.y, cell.h, h, height),
        w,
        h,
    );
    Crop {
        region,
        target,
        cell,
    }
}

fn snap_max(config: &CropConfig) -> u32 {
    let m = config.multiple.max(1);
    (config.max_side / m * m).max(m)
}

/// The crops for a dilated mask whose bounding box is `bbox` (see the module docs).
pub fn plan(dilated: &GrayImage, bbox: Rect, config: &CropConfig) -> Vec<Crop> {
    let (width, height) = dilated.dimensions();
    let crop = |cell: Rect| crop_for(cell, width, height, config);
    let splittable = |c: &Crop| -> bool {
        c.scale() < 1.0
            && c.cell.w.max(c.cell.h) >= 2
            && fill(dilated, c.cell) < config.split_below_fill
    };
    let mut crops = vec![crop(bbox)];
    while crops.len() < config.max_crops.max(1) {
        // The most downscaled crop that may still be split.
        let Some((i, _)) = crops
            .iter()
            .enumerate()
            .filter(|(_, c)| splittable(c))
            .min_by(|a, b| a.1.scale().total_cmp(&b.1.scale()))
        else {
            break;
        };
        let cell = crops[i].cell;
        let halves = split(cell);
        let parts: Vec<Rect> = halves
            .into_iter()
            .filter_map(|half| tight(dilated, half))
            .collect();
        if parts.len() < 2 || crops.len() + parts.len() - 1 > config.max_crops {
            break;
        }
        crops.splice(i..=i, parts.into_iter().map(crop));
    }
    crops
}

/// The two halves of `r` across its longer side.
fn split(r: Rect) -> [Rect; 2] {
    if r.w >= r.h {
        let a = r.w / 2;
        [
            Rect::new(r.x, r.y, a, r.h),
            Rect::new(r.x + a, r.y, r.w - a, r.h),
        ]
    } else {
        let a = r.h / 2;
        [
            Rect::new(r.x, r.y, r.w, a),
            Rect::new(r.x, r.y + a, r.w, r.h - a),
        ]
    }
}

/// Bounding box of the white pixels of `mask` inside `r`.
pub fn tight(mask: &GrayImage, r: Rect) -> Option<Rect> {
    let (mut x0, mut y0, mut x1, mut y1) = (u32::MAX, u32::MAX, 0, 0);
    for y in r.y..r.bottom() {
        for x in r.x..r.right() {
            if mask.get_pixel(x, y).0[0] > 0 {
                x0 = x0.min(x);
                y0 = y0.min(y);
                x1 = x1.max(x + 1);
                y1 = y1.max(y + 1);
            }
        }
    }
    (x0 < x1).then(|| Rect::new(x0, y0, x1 - x0, y1 - y0))
}

/// Share of the pixels of `r` that are white in `mask`.
pub fn fill(mask: &GrayImage, r: Rect) -> f64 {
    let mut white = 0u64;
    for y in r.y..r.bottom() {
        for x in r.x..r.right() {
            if mask.get_pixel(x, y).0[0] > 0 {
                white += 1;
            }
        }
    }
    white as f64 / r.area().max(1) as f64
}

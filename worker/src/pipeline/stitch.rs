//! Stage 8, stitch: paste the model's output back into the photo through a feathered mask.
//!
//! For each crop the paste weight of a photo pixel is `alpha · weight`:
//! - `alpha = min(1, d / radius)`, `d` the Euclidean distance to the nearest pixel *outside* the
//!   dilated mask and `radius` the dilation radius. It is exactly 0 outside the dilated mask and
//!   1 on the cleaned mask itself (every such pixel is more than `radius` from the outside), with
//!   a linear ramp across the dilation ring;
//! - `weight = max(0, 1 − dist(pixel, cell) / blend_px)`: 1 on the crop's own cell, fading over
//!   `blend_px` into the neighbouring cells (only matters when a mask is split into several crops).
//!
//! Pixels with weight 0 are not written at all, so everything outside the dilated mask keeps the
//! photo's bytes exactly; pixels of the cleaned mask get the model's output exactly.

use image::{GrayImage, Luma, RgbImage};
use imageproc::distance_transform::euclidean_squared_distance_transform;

use super::Rect;
use super::crop::Crop;

/// The feather `alpha` (see the module docs) for every pixel of `region`, row-major.
pub fn feather(dilated: &GrayImage, region: Rect, radius: f32) -> Vec<f32> {
    let (width, height) = dilated.dimensions();
    let radius = radius.max(1.0);
    // Distances up to `radius` are exact when computed on the region grown by radius + 1.
    let margin = radius.ceil() as u32 + 1;
    let area = region.expand(margin, width, height);
    let mut outside = GrayImage::new(area.w, area.h);
    for (x, y, p) in outside.enumerate_pixels_mut() {
        if dilated.get_pixel(area.x + x, area.y + y).0[0] == 0 {
            *p = Luma([255]);
        }
    }
    let d2 = euclidean_squared_distance_transform(&outside);
    let (ox, oy) = (region.x - area.x, region.y - area.y);
    let mut alpha = Vec::with_capacity(region.area() as usize);
    for y in 0..region.h {
        for x in 0..region.w {
            let d = d2.get_pixel(ox + x, oy + y).0[0].sqrt() as f32;
            alpha.push(if d.is_finite() {
                (d / radius).min(1.0)
            } else {
                1.0
            });
        }
    }
    alpha
}

/// Weight of the crop owning `cell` at photo pixel (x, y) (see the module docs).
pub fn cell_weight(x: u32, y: u32, cell: Rect, blend_px: u32) -> f32 {
    let dx = (cell.x as i64 - x as i64)
        .max(x as i64 - (cell.right() as i64 - 1))
        .max(0);
    let dy = (cell.y as i64 - y as i64)
        .max(y as i64 - (cell.bottom() as i64 - 1))
        .max(0);
    if dx == 0 && dy == 0 {
        return 1.0;
    }
    if blend_px == 0 {
        return 0.0;
    }
    let d = ((dx * dx + dy * dy) as f32).sqrt();
    (1.0 - d / blend_px as f32).max(0.0)
}

/// What a paste changed.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StitchStats {
    /// Pixels that took the model's output as is.
    pub replaced: u64,
    /// Pixels mixed from photo and model output.
    pub blended: u64,
}

/// Pastes `patch` (the model's output at `crop.region`'s size) into `photo`.
pub fn paste(
    photo: &mut RgbImage,
    patch: &RgbImage,
    crop: &Crop,
    dilated: &GrayImage,
    radius: u8,
    blend_px: u32,
) -> StitchStats {
    let r = crop.region;
    debug_assert_eq!(patch.dimensions(), (r.w, r.h));
    let alpha = feather(dilated, r, radius as f32);
    let mut stats = StitchStats::default();
    for y in 0..r.h {
        for x in 0..r.w {
            let a = alpha[(y * r.w + x) as usize];
            if a <= 0.0 {
                continue;
            }
            let (px, py) = (r.x + x, r.y + y);
            let a = a * cell_weight(px, py, crop.cell, blend_px);
            if a <= 0.0 {
                continue;
            }
            let src = patch.get_pixel(x, y).0;
            let dst = photo.get_pixel_mut(px, py);
            if a >= 1.0 {
                dst.0 = src;
                stats.replaced += 1;
            } else {
                for (d, s) in dst.0.iter_mut().zip(src) {
                    let v = *d as f32 * (1.0 - a) + s as f32 * a;
                    *d = v.round().clamp(0.0, 255.0) as u8;
                }
                stats.blended += 1;
            }
        }
    }
    stats
}

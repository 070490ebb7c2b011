//! Stage 2, mask: binarize, drop specks, dilate.
//!
//! 1. **Binarize** at `threshold` (white = fill; JPEG masks have grey edges and ringing).
//! 2. **Drop specks**: an 8-connected component of the binary mask is kept when it survives a
//!    morphological opening with a 5×5 ellipse somewhere (it is at least that thick) *or* when it
//!    has at least `min_component_px` pixels (thin but long, like a leash). Everything else —
//!    stray brush dots, compression noise — is removed. Kept components keep their full shape
//!    (opening by reconstruction), so a leash's thin parts are not eaten by the opening.
//! 3. **Dilate** by `dilate_px` (Euclidean disk) to cover the soft edge and the shadow of the
//!    object; this dilated mask is what the model fills, and the stitch feathers across the
//!    dilation ring so pixels outside it are never touched.
//!
//! Empty masks and masks that cover (almost) the whole frame are refused: there is nothing to
//! fill, or nothing to fill it from.

use image::{GrayImage, Luma, imageops};
use imageproc::distance_transform::Norm;
use imageproc::morphology::{Mask, dilate, grayscale_open};
use imageproc::region_labelling::{Connectivity, connected_components};

use super::Rect;

/// How a mask is cleaned.
#[derive(Clone, Debug, PartialEq)]
pub struct MaskConfig {
    /// Grey level at or above which a mask pixel counts as white (fill).
    pub threshold: u8,
    /// Components at least this large are kept even when thinner than the 5×5 ellipse.
    pub min_component_px: u32,
    /// Dilation radius in pixels; `None` scales with the image: long side / 128, in [4, 48].
    pub dilate_px: Option<u8>,
    /// Largest share of the frame the dilated mask may cover.
    pub max_coverage: f64,
}

impl Default for MaskConfig {
    fn default() -> Self {
        MaskConfig {
            threshold: 128,
            min_component_px: 64,
            dilate_px: None,
            max_coverage: 0.95,
        }
    }
}

impl MaskConfig {
    /// The dilation radius for an image of the given size.
    pub fn dilate_radius(&self, width: u32, height: u32) -> u8 {
        self.dilate_px.unwrap_or_else(|| {
            let r = (width.max(height) as f64 / 128.0).round();
            r.clamp(4.0, 48.0) as u8
        })
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MaskError {
    #[error("the mask is empty: no pixel at or above {threshold} (white = fill)")]
    Empty { threshold: u8 },
    #[error(
        "the mask has only specks ({pixels} white pixels in components thinner than 5 px and smaller than {min_component_px} px)"
    )]
    OnlySpecks { pixels: u64, min_component_px: u32 },
    #[error(
        "the mask covers {:.1}% of the image (limit {:.0}%): nothing is left to fill it from",
        coverage * 100.0,
        limit * 100.0
    )]
    CoversImage { coverage: f64, limit: f64 },
}

/// A cleaned mask: `core` (0/255) is what must be replaced, `dilated` (0/255) what may change.
#[derive(Clone, Debug)]
pub struct CleanMask {
    pub core: GrayImage,
    pub dilated: GrayImage,
    /// Dilation radius used (also the feather width of the stitch).
    pub radius: u8,
    /// Bounding box of `dilated`.
    pub bbox: Rect,
    /// White pixels of `core` / all pixels.
    pub core_coverage: f64,
    /// White pixels of `dilated` / all pixels.
    pub coverage: f64,
    /// Pixels removed as specks.
    pub specks_removed: u64,
}

/// The 5×5 ellipse structuring element (as OpenCV's `getStructuringElement(MORPH_ELLIPSE, (5, 5))`).
pub fn ellipse5() -> Mask {
    #[rustfmt::skip]
    let e: [u8; 25] = [
          0,   0, 255,   0,   0,
        255, 255, 255, 255, 255,
        255, 255, 255, 255, 255,
        255, 255, 255, 255, 255,
          0,   0, 255,   0,   0,
    ];
    // The buffer has exactly 5×5 pixels, so this cannot fail.
    let img = GrayImage::from_raw(5, 5, e.to_vec()).unwrap_or_else(|| GrayImage::new(5, 5));
    Mask::from_image(&img, 2, 2)
}

/// Binarizes: 255 where `mask >= threshold`, else 0.
pub fn binarize(mask: &GrayImage, threshold: u8) -> GrayImage {
    let mut out = mask.clone();
    for p in out.pixels_mut() {
        p.0[0] = if p.0[0] >= threshold { 255 } else { 0 };
    }
    out
}

/// Removes specks from a binary mask (see the module docs). Returns the mask and the number
/// of pixels removed.
pub fn remove_specks(binary: &GrayImage, min_component_px: u32) -> (GrayImage, u64) {
    let opened = grayscale_open(binary, &ellipse5());
    let labels = connected_components(binary, Connectivity::Eight, Luma([0u8]));
    let n = labels.pixels().map(|p| p.0[0]).max().unwrap_or(0) as usize;
    let mut area = vec![0u32; n + 1];
    let mut thick = vec![false; n + 1];
    for ((l, o), _) in labels.pixels().zip(opened.pixels()).zip(binary.pixels()) {
        let l = l.0[0] as usize;
        if l == 0 {
            continue;
        }
        area[l] += 1;
        if o.0[0] > 0 {
            thick[l] = true;
        }
    }
    let keep: Vec<bool> = (0..=n)
        .map(|l| l > 0 && (thick[l] || area[l] >= min_component_px))
        .collect();
    let mut removed = 0u64;
    let mut out = GrayImage::new(binary.width(), binary.height());
    for (o, l) in out.pixels_mut().zip(labels.pixels()) {
        let l = l.0[0] as usize;
        if l == 0 {
            continue;
        }
        if keep[l] {
            o.0[0] = 255;
        } else {
            removed += 1;
        }
    }
    (out, removed)
}

/// Runs the whole stage. The morphology runs on the mask's bounding box grown by the dilation
/// radius (plus the ellipse's reach), so a small mask in a large photo costs little.
pub fn clean(mask: &GrayImage, config: &MaskConfig) -> Result<CleanMask, MaskError> {
    let (w, h) = mask.dimensions();
    let total = (w as u64 * h as u64).max(1);
    let binary = binarize(mask, config.threshold);
    let Some(white_box) = Rect::bounding(&binary) else {
        return Err(MaskError::Empty {
            threshold: config.threshold,
        });
    };
    let radius = config.dilate_radius(w, h);
    let area = white_box.expand(radius as u32 + 3, w, h);
    let sub = imageops::crop_imm(&binary, area.x, area.y, area.w, area.h).to_image();
    let (sub_core, specks_removed) = remove_specks(&sub, config.min_component_px);
    let core_white = count_white(&sub_core);
    if core_white == 0 {
        return Err(MaskError::OnlySpecks {
            pixels: specks_removed,
            min_component_px: config.min_component_px,
        });
    }
    let sub_dilated = dilate(&sub_core, Norm::L2, radius);
    let dilated_white = count_white(&sub_dilated);
    let coverage = dilated_white as f64 / total as f64;
    if coverage > config.max_coverage {
        return Err(MaskError::CoversImage {
            coverage,
            limit: config.max_coverage,
        });
    }
    let mut core = GrayImage::new(w, h);
    let mut dilated = GrayImage::new(w, h);
    imageops::replace(&mut core, &sub_core, area.x as i64, area.y as i64);
    imageops::replace(&mut dilated, &sub_dilated, area.x as i64, area.y as i64);
    // Non-empty (it holds the core), so a bounding box exists.
    let bbox = Rect::bounding(&sub_dilated)
        .map(|b| Rect::new(b.x + area.x, b.y + area.y, b.w, b.h))
        .unwrap_or(area);
    Ok(CleanMask {
        core,
        dilated,
        radius,
        bbox,
        core_coverage: core_white as f64 / total as f64,
        coverage,
        specks_removed,
    })
}

pub fn count_white(mask: &GrayImage) -> u64 {
    mask.pixels().filter(|p| p.0[0] > 0).count() as u64
}

//! Pixel rectangles, the unit of every crop, region and cell the stages pass around.

use image::GrayImage;

use super::crop;

/// An axis-aligned rectangle of pixels: `[x, x + w) × [y, y + h)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub w: u32,
    pub h: u32,
}

impl Rect {
    pub const fn new(x: u32, y: u32, w: u32, h: u32) -> Self {
        Rect { x, y, w, h }
    }
    pub fn right(&self) -> u32 {
        self.x + self.w
    }
    pub fn bottom(&self) -> u32 {
        self.y + self.h
    }
    pub fn area(&self) -> u64 {
        self.w as u64 * self.h as u64
    }
    pub fn contains(&self, other: &Rect) -> bool {
        other.x >= self.x
            && other.y >= self.y
            && other.right() <= self.right()
            && other.bottom() <= self.bottom()
    }
    /// Grown by `m` on every side, clipped to a `width`×`height` frame.
    pub fn expand(&self, m: u32, width: u32, height: u32) -> Rect {
        let x = self.x.saturating_sub(m);
        let y = self.y.saturating_sub(m);
        let r = (self.right().saturating_add(m)).min(width);
        let b = (self.bottom().saturating_add(m)).min(height);
        Rect::new(x, y, r - x, b - y)
    }
    /// Bounding box of the non-zero pixels of `mask`.
    pub fn bounding(mask: &GrayImage) -> Option<Rect> {
        let (w, h) = mask.dimensions();
        crop::tight(mask, Rect::new(0, 0, w, h))
    }
}

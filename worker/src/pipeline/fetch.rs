//! Stage 1, fetch + validate: read the photo and the mask, decode, check.
//!
//! - Formats: PNG, JPEG, WebP, recognised by their bytes (not by the URI's extension).
//! - EXIF orientation is applied (JPEG, WebP, PNG `eXIf`), so the pixels are upright as a
//!   viewer shows them; photo and mask get the same treatment.
//! - Size limits are checked from the header, before any pixel is decoded (a decompression bomb
//!   costs a few header bytes): at most `max_pixels`, at least `min_side` per side; the decoder's
//!   own allocation limit stays on as a second guard.
//! - Alpha is dropped (the photo is composited on nothing; the mask is read as luminance).
//! - **Mask size policy** (`MaskSizePolicy`): `resize` (default) accepts a mask of another size
//!   when its aspect ratio matches the photo's within 2 % and resizes it (bilinear, then
//!   binarized by the mask stage); a different aspect ratio is always refused. `reject` refuses
//!   any size difference.

use std::io::Cursor;

use image::imageops::FilterType;
use image::{DynamicImage, GrayImage, ImageDecoder, ImageFormat, ImageReader, Limits, RgbImage};

/// What to do with a mask whose size differs from the photo's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum MaskSizePolicy {
    /// Resize a mask with the photo's aspect ratio (±2 %); refuse others.
    #[default]
    Resize,
    /// Refuse any mask whose size differs from the photo's.
    Reject,
}

/// Limits on inputs.
#[derive(Clone, Debug, PartialEq)]
pub struct InputLimits {
    /// Most pixels (width × height) of a photo or mask.
    pub max_pixels: u64,
    /// Fewest pixels per side of a photo.
    pub min_side: u32,
    /// Most bytes read for one input.
    pub max_bytes: u64,
    pub mask_policy: MaskSizePolicy,
}

impl Default for InputLimits {
    fn default() -> Self {
        InputLimits {
            max_pixels: 40_000_000,
            min_side: 16,
            max_bytes: 64 << 20,
            mask_policy: MaskSizePolicy::Resize,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("not an image: the bytes are not PNG, JPEG or WebP")]
    NotAnImage,
    #[error("unsupported image format {0} (expected PNG, JPEG or WebP)")]
    UnsupportedFormat(String),
    #[error("corrupt or truncated {format} image: {reason}")]
    Corrupt { format: String, reason: String },
    #[error("image is {width}×{height} = {pixels} pixels, over the limit of {limit}")]
    TooLarge {
        width: u32,
        height: u32,
        pixels: u64,
        limit: u64,
    },
    #[error("image is {width}×{height}, below the minimum of {min}×{min}")]
    TooSmall { width: u32, height: u32, min: u32 },
    #[error(
        "mask is {mask_w}×{mask_h} but the photo is {width}×{height} ({policy}; the mask size policy is {policy_name})"
    )]
    MaskSize {
        mask_w: u32,
        mask_h: u32,
        width: u32,
        height: u32,
        policy: &'static str,
        policy_name: &'static str,
    },
}

fn format_name(f: ImageFormat) -> String {
    format!("{f:?}").to_uppercase()
}

/// Decodes any supported image with orientation applied and limits checked.
fn decode(bytes: &[u8], limits: &InputLimits, min_side: u32) -> Result<DynamicImage, DecodeError> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|_| DecodeError::NotAnImage)?;
    let format = match reader.format() {
        None => return Err(DecodeError::NotAnImage),
        Some(f @ (ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP)) => f,
        Some(other) => return Err(DecodeError::UnsupportedFormat(format_name(other))),
    };
    let corrupt = |e: image::ImageError| DecodeError::Corrupt {
        format: format_name(format),
        reason: e.to_string(),
    };
    if format == ImageFormat::Jpeg && !jpeg_is_complete(bytes) {
        // The JPEG decoder fills missing scan data with grey instead of failing.
        return Err(DecodeError::Corrupt {
            format: format_name(format),
            reason: "no end-of-image marker after the image data (truncated)".into(),
        });
    }
    let mut reader = reader;
    let mut decoder_limits = Limits::default();
    decoder_limits.max_alloc = Some((limits.max_pixels * 8).max(512 << 20));
    reader.limits(decoder_limits);
    let mut decoder = reader.into_decoder().map_err(corrupt)?;
    let (width, height) = decoder.dimensions();
    let pixels = width as u64 * height as u64;
    if pixels > limits.max_pixels {
        return Err(DecodeError::TooLarge {
            width,
            height,
            pixels,
            limit: limits.max_pixels,
        });
    }
    if width < min_side || height < min_side {
        return Err(DecodeError::TooSmall {
            width,
            height,
            min: min_side,
        });
    }
    // A broken EXIF block is not worth failing the job: keep the stored orientation.
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder).map_err(corrupt)?;
    img.apply_orientation(orientation);
    Ok(img)
}

/// True when a JPEG's main image data is followed by an end-of-image marker (FF D9).
///
/// Walks the marker segments from the start (skipping APPn blocks such as an EXIF thumbnail,
/// which has its own markers), then looks for FF D9 after the first start-of-scan. Inside
/// entropy-coded data an FF byte is always followed by 00 or a restart marker, so FF D9 there
/// is the real end. Data after the marker (e.g. an appended video) is allowed.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let mut i = 2; // after SOI
    while i + 4 <= bytes.len() {
        if bytes[i] != 0xFF {
            return false;
        }
        let marker = bytes[i + 1];
        match marker {
            0xFF => i += 1, // fill byte
            0xD8 | 0x01 | 0xD0..=0xD7 => i += 2,
            0xD9 => return false, // end before any scan
            _ => {
                let len = u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]) as usize;
                let next = i + 2 + len;
                if marker == 0xDA {
                    return bytes
                        .get(next..)
                        .is_some_and(|rest| rest.windows(2).any(|w| w == [0xFF, 0xD9]));
                }
                i = next;
            }
        }
    }
    false
}

/// Decodes the photo to RGB.
pub fn decode_image(bytes: &[u8], limits: &InputLimits) -> Result<RgbImage, DecodeError> {
    Ok(decode(bytes, limits, limits.min_side)?.to_rgb8())
}

/// Decodes the mask to luminance at the photo's size (`width`×`height`), by the size policy.
pub fn decode_mask(
    bytes: &[u8],
    limits: &InputLimits,
    width: u32,
    height: u32,
) -> Result<GrayImage, DecodeError> {
    let mask = decode(bytes, limits, 1)?.to_luma8();
    let (mw, mh) = mask.dimensions();
    if (mw, mh) == (width, height) {
        return Ok(mask);
    }
    let policy_name = match limits.mask_policy {
        MaskSizePolicy::Resize => "resize",
        MaskSizePolicy::Reject => "reject",
    };
    let mismatch = |policy| DecodeError::MaskSize {
        mask_w: mw,
        mask_h: mh,
        width,
        height,
        policy,
        policy_name,
    };
    match limits.mask_policy {
        MaskSizePolicy::Reject => Err(mismatch("sizes differ")),
        MaskSizePolicy::Resize => {
            let photo = width as f64 / height as f64;
            let ratio = mw as f64 / mh as f64;
            if ((ratio - photo) / photo).abs() > 0.02 {
                return Err(mismatch("aspect ratios differ by more than 2%"));
            }
            Ok(image::imageops::resize(
                &mask,
                width,
                height,
                FilterType::Triangle,
            ))
        }
    }
}

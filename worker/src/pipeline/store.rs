//! Stage 9, store: encode the result in the format the output URI's extension names and write
//! it atomically (see `storage`).

use std::io::Cursor;

use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::PngEncoder;
use image::codecs::webp::WebPEncoder;
use image::{ExtendedColorType, ImageEncoder, RgbImage};

/// Output formats, by extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    Png,
    /// Quality 95.
    Jpeg,
    /// Lossless.
    WebP,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum StoreError {
    #[error("output {0:?} has no supported extension (.png, .jpg, .jpeg, .webp)")]
    UnsupportedFormat(String),
    #[error("encoding the result failed: {0}")]
    Encode(String),
}

impl OutputFormat {
    /// The format of an output URI (`…/result.png?x=y` → PNG).
    pub fn from_uri(uri: &str) -> Result<Self, StoreError> {
        let path = uri.split(['?', '#']).next().unwrap_or(uri);
        let ext = path
            .rsplit('/')
            .next()
            .and_then(|name| name.rsplit_once('.'))
            .map(|(_, ext)| ext.to_ascii_lowercase());
        match ext.as_deref() {
            Some("png") => Ok(OutputFormat::Png),
            Some("jpg" | "jpeg") => Ok(OutputFormat::Jpeg),
            Some("webp") => Ok(OutputFormat::WebP),
            _ => Err(StoreError::UnsupportedFormat(uri.to_string())),
        }
    }
}

/// Encodes an RGB image.
pub fn encode(image: &RgbImage, format: OutputFormat) -> Result<Vec<u8>, StoreError> {
    let mut buf = Cursor::new(Vec::new());
    let (w, h) = image.dimensions();
    let res = match format {
        OutputFormat::Png => {
            PngEncoder::new(&mut buf).write_image(image.as_raw(), w, h, ExtendedColorType::Rgb8)
        }
        OutputFormat::Jpeg => JpegEncoder::new_with_quality(&mut buf, 95).write_image(
            image.as_raw(),
            w,
            h,
            ExtendedColorType::Rgb8,
        ),
        OutputFormat::WebP => WebPEncoder::new_lossless(&mut buf).write_image(
            image.as_raw(),
            w,
            h,
            ExtendedColorType::Rgb8,
        ),
    };
    res.map_err(|e| StoreError::Encode(e.to_string()))?;
    Ok(buf.into_inner())
}

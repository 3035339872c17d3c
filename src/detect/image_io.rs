//! Image decoding with limits: a request body is untrusted, and a tiny file can declare a huge
//! image (a decompression bomb), so dimensions and allocation are bounded before decoding.

use std::io::Cursor;

use image::{ImageReader, Limits, RgbImage};

use crate::error::{Error, Result};

/// Largest accepted width or height, in pixels.
pub const MAX_IMAGE_SIDE: u32 = 16_384;
/// Largest allocation the decoder may make.
pub const MAX_DECODE_BYTES: u64 = 512 * 1024 * 1024;

/// Decodes JPEG, PNG, BMP, WebP or GIF bytes into RGB.
pub fn decode_rgb(bytes: &[u8]) -> Result<RgbImage> {
    if bytes.is_empty() {
        return Err(Error::Input("empty image".into()));
    }
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::Input(format!("cannot read image: {e}")))?;
    if reader.format().is_none() {
        return Err(Error::Input(
            "not an image in a supported format (JPEG, PNG, BMP, WebP, GIF)".into(),
        ));
    }
    if reader.format() == Some(image::ImageFormat::Jpeg) && !jpeg_has_end_after_last_scan(bytes) {
        return Err(Error::Input(
            "corrupt or truncated image: the JPEG data ends before its last scan is complete"
                .into(),
        ));
    }
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| match e {
        image::ImageError::Limits(_) => Error::Input(format!(
            "image too large: at most {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE} pixels are accepted ({e})"
        )),
        image::ImageError::Unsupported(_) => Error::Input(format!("unsupported image: {e}")),
        _ => Error::Input(format!("corrupt or truncated image: {e}")),
    })?;
    if img.width() == 0 || img.height() == 0 {
        return Err(Error::Input("image has no pixels".into()));
    }
    Ok(img.to_rgb8())
}

/// The JPEG decoder fills a cut-off scan with grey instead of failing, so a truncated upload would
/// be "detected" as a half-grey photo. A complete file has an end-of-image marker after its last
/// start-of-scan marker; inside entropy-coded data 0xFF is always followed by 0x00 or a restart
/// marker, so neither marker can appear there by accident. Searching after the *last* scan skips an
/// EXIF thumbnail's own end marker, and bytes after the end marker are tolerated.
fn jpeg_has_end_after_last_scan(bytes: &[u8]) -> bool {
    bytes
        .windows(2)
        .rposition(|w| w == [0xFF, 0xDA])
        .is_some_and(|sos| bytes[sos..].windows(2).any(|w| w == [0xFF, 0xD9]))
}

/// Reads and decodes an image file.
pub fn load_rgb(path: &std::path::Path) -> Result<RgbImage> {
    let bytes = crate::error::read_file(path)?;
    decode_rgb(&bytes).map_err(|e| Error::Input(format!("{}: {e}", path.display())))
}

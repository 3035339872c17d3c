//! Checks an uploaded image's header before decoding it, so each kind of bad upload gets its own
//! status: bytes that are no image (400), an image format the decoder lacks (415), and a declared
//! size over the decoder's limits (422, the decompression-bomb case). `decode_rgb` enforces the
//! same limits, but its errors are all `Error::Input`, which cannot tell these apart.

use std::io::Cursor;

use image::{ImageDecoder, ImageFormat, ImageReader};

use crate::detect::image_io::{MAX_DECODE_BYTES, MAX_IMAGE_SIDE};
use crate::serve::error::AppError;

const ACCEPTED: [ImageFormat; 5] = [
    ImageFormat::Jpeg,
    ImageFormat::Png,
    ImageFormat::Bmp,
    ImageFormat::WebP,
    ImageFormat::Gif,
];

/// Reads only the image header (never the pixels) and rejects, with the status that fits, what
/// `decode_rgb` would refuse anyway.
pub(crate) fn inspect(bytes: &[u8]) -> Result<(), AppError> {
    if bytes.is_empty() {
        return Err(AppError::BadRequest("empty body: send an image".into()));
    }
    let format = image::guess_format(bytes).map_err(|_| {
        AppError::BadRequest(
            "the body is not an image (expected JPEG, PNG, BMP, WebP or GIF)".into(),
        )
    })?;
    if !ACCEPTED.contains(&format) {
        return Err(AppError::UnsupportedMediaType(format!(
            "{} images are not supported; send JPEG, PNG, BMP, WebP or GIF",
            format.to_mime_type()
        )));
    }
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    // The limits are judged below from the declared size, so the reply can say which one was hit.
    reader.no_limits();
    let decoder = reader
        .into_decoder()
        .map_err(|e| AppError::BadRequest(format!("corrupt image header: {e}")))?;
    let (width, height) = decoder.dimensions();
    if width > MAX_IMAGE_SIDE || height > MAX_IMAGE_SIDE {
        return Err(AppError::Unprocessable(format!(
            "image declares {width}x{height} pixels; at most {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE} are accepted"
        )));
    }
    if decoder.total_bytes() > MAX_DECODE_BYTES {
        return Err(AppError::Unprocessable(format!(
            "image declares {width}x{height} pixels that need {} MiB decoded; at most {} MiB are accepted",
            decoder.total_bytes() >> 20,
            MAX_DECODE_BYTES >> 20
        )));
    }
    if width == 0 || height == 0 {
        return Err(AppError::BadRequest("image has no pixels".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny_jpeg() -> Vec<u8> {
        let img = image::RgbImage::from_pixel(16, 8, image::Rgb([200, 30, 30]));
        let mut out = Cursor::new(Vec::new());
        img.write_to(&mut out, ImageFormat::Jpeg)
            .expect("encoding to memory cannot fail");
        out.into_inner()
    }

    #[test]
    fn a_valid_image_passes() {
        assert!(inspect(&tiny_jpeg()).is_ok());
    }

    #[test]
    fn non_images_and_other_formats_are_told_apart() {
        assert!(matches!(inspect(b""), Err(AppError::BadRequest(_))));
        assert!(matches!(
            inspect(b"hello, world"),
            Err(AppError::BadRequest(_))
        ));
        // A TIFF signature: a real image format, but not one the decoder is built with.
        assert!(matches!(
            inspect(b"II*\0\x08\0\0\0"),
            Err(AppError::UnsupportedMediaType(_))
        ));
    }
}

//! Extractors whose rejections are [`AppError`]s: the uploaded image and the query string.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Multipart, Query, Request};
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::AppState;
use super::error::{AppError, clip};

/// Raw-body media types taken as an image. The bytes are sniffed whatever the type says, so a
/// mislabelled upload still decodes; the list only keeps out bodies that are plainly not images.
const RAW_IMAGE_TYPES: [&str; 9] = [
    "image/jpeg",
    "image/jpg",
    "image/pjpeg",
    "image/png",
    "image/bmp",
    "image/x-ms-bmp",
    "image/webp",
    "image/gif",
    "application/octet-stream",
];

/// Multipart form field that carries the image.
pub const IMAGE_FIELD: &str = "image";

/// The undecoded bytes of an uploaded image: a `multipart/form-data` field named `image`, or a
/// raw body with an image content type.
pub struct ImageUpload(pub Bytes);

impl FromRequest<Arc<AppState>> for ImageUpload {
    type Rejection = AppError;

    async fn from_request(req: Request, state: &Arc<AppState>) -> Result<Self, AppError> {
        let limit = state.options().max_body_bytes;
        // Refuse a declared oversize body before reading any of it. Bodies without a length
        // (chunked) are cut off at the same limit by `DefaultBodyLimit` while being read.
        let declared = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit as u64) {
            return Err(too_large(limit));
        }
        let media_type = req.headers().get(CONTENT_TYPE).map(|v| {
            v.to_str()
                .unwrap_or("")
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
        let bytes = match media_type.as_deref() {
            Some("multipart/form-data") => {
                let mut form = Multipart::from_request(req, state).await?;
                image_field(&mut form).await?
            }
            // A client that names no type gets its bytes sniffed, as for octet-stream.
            None => Bytes::from_request(req, state).await?,
            Some(t) if RAW_IMAGE_TYPES.contains(&t) => Bytes::from_request(req, state).await?,
            Some(t) => {
                return Err(AppError::UnsupportedMediaType(format!(
                    "content type {:?} is not accepted; send multipart/form-data with an `{IMAGE_FIELD}` \
                     field, or the image itself as image/jpeg, image/png, image/bmp, image/webp, \
                     image/gif or application/octet-stream",
                    clip(t)
                )));
            }
        };
        if bytes.is_empty() {
            return Err(AppError::BadRequest("empty body: send an image".into()));
        }
        Ok(ImageUpload(bytes))
    }
}

fn too_large(limit: usize) -> AppError {
    AppError::PayloadTooLarge(format!(
        "the body is larger than the limit of {limit} bytes"
    ))
}

async fn image_field(form: &mut Multipart) -> Result<Bytes, AppError> {
    while let Some(field) = form.next_field().await? {
        if field.name() == Some(IMAGE_FIELD) {
            let bytes = field.bytes().await?;
            if bytes.is_empty() {
                return Err(AppError::BadRequest(format!(
                    "the multipart field `{IMAGE_FIELD}` is empty"
                )));
            }
            return Ok(bytes);
        }
    }
    Err(AppError::BadRequest(format!(
        "the multipart body has no field named `{IMAGE_FIELD}`"
    )))
}

/// `Query<T>` whose rejection is an [`AppError`].
pub struct ValidQuery<T>(pub T);

impl<T, S> FromRequestParts<S> for ValidQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, AppError> {
        let Query(value) = Query::<T>::from_request_parts(parts, state).await?;
        Ok(ValidQuery(value))
    }
}

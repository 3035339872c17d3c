//! The one error type every handler and extractor returns. Each failure maps to a status code and
//! the same JSON body, `{"error": "..."}`, so a client parses one shape whatever went wrong.

use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::multipart::{MultipartError, MultipartRejection};
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::error::Error;

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// The request is malformed: no image, an image that does not decode, a bad query string.
    #[error("{0}")]
    BadRequest(String),
    /// The request names a model (or route) that is not served.
    #[error("{0}")]
    NotFound(String),
    /// The body is larger than `--max-body-bytes`.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// The body is neither multipart nor an accepted image type, or the image format is not one
    /// the decoder handles.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// Well-formed but unacceptable: thresholds out of range, or an image whose declared size is
    /// over the decoder's limits (a decompression bomb).
    #[error("{0}")]
    Unprocessable(String),
    /// Models are still loading or warming up.
    #[error("models are still loading; retry when /readyz answers 200")]
    NotReady,
    /// Every inference slot stayed busy for the whole queue timeout.
    #[error("server busy: no inference slot became free within {} ms", .0.as_millis())]
    Busy(Duration),
    /// A server-side failure. The detail is logged, never sent: it can name files and internals.
    #[error("internal error")]
    Internal(String),
}

impl AppError {
    pub fn status(&self) -> StatusCode {
        match self {
            AppError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AppError::NotFound(_) => StatusCode::NOT_FOUND,
            AppError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            AppError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            AppError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            AppError::NotReady | AppError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            AppError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Maps an extractor rejection's status onto the variant that carries it; anything the
    /// client did not cause still reads as a bad request, since all of these come from parsing
    /// what the client sent.
    fn from_rejection(status: StatusCode, message: String) -> Self {
        match status {
            StatusCode::PAYLOAD_TOO_LARGE => AppError::PayloadTooLarge(message),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => AppError::UnsupportedMediaType(message),
            _ => AppError::BadRequest(message),
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let status = self.status();
        let message = match &self {
            AppError::Internal(detail) => {
                tracing::error!(%detail, "request failed");
                self.to_string()
            }
            other => other.to_string(),
        };
        let mut response = (status, Json(ErrorBody { error: message })).into_response();
        if matches!(self, AppError::Busy(_)) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

/// Library errors met while serving a request: input problems are the client's, the rest are
/// server failures whose detail stays in the log.
impl From<Error> for AppError {
    fn from(e: Error) -> Self {
        match e {
            Error::Input(m) => AppError::BadRequest(m),
            other => AppError::Internal(other.to_string()),
        }
    }
}

impl From<QueryRejection> for AppError {
    fn from(r: QueryRejection) -> Self {
        AppError::BadRequest(format!("invalid query string: {}", r.body_text()))
    }
}

impl From<BytesRejection> for AppError {
    fn from(r: BytesRejection) -> Self {
        AppError::from_rejection(r.status(), r.body_text())
    }
}

impl From<MultipartRejection> for AppError {
    fn from(r: MultipartRejection) -> Self {
        AppError::from_rejection(r.status(), r.body_text())
    }
}

impl From<MultipartError> for AppError {
    fn from(e: MultipartError) -> Self {
        AppError::from_rejection(
            e.status(),
            format!("invalid multipart body: {}", e.body_text()),
        )
    }
}

/// Gives error responses produced outside the handlers (405 from the method router, 408 from the
/// timeout layer) the same JSON shape as [`AppError`], keeping their status and headers.
pub(crate) async fn json_error_bodies(response: Response) -> Response {
    let status = response.status();
    let is_error = status.is_client_error() || status.is_server_error();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !is_error || is_json {
        return response;
    }
    let (mut parts, _) = response.into_parts();
    let error = status
        .canonical_reason()
        .unwrap_or("request failed")
        .to_lowercase();
    let body = serde_json::to_vec(&ErrorBody { error }).unwrap_or_default();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, Body::from(body))
}

/// Shortens client-supplied text echoed in an error message, so a huge query value is not
/// reflected back whole.
pub(crate) fn clip(text: &str) -> String {
    const MAX_CHARS: usize = 80;
    if text.chars().count() <= MAX_CHARS {
        text.to_string()
    } else {
        let head: String = text.chars().take(MAX_CHARS).collect();
        format!("{head}...")
    }
}

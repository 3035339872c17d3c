//! Route handlers and the JSON they answer with.

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, Method, Uri, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::AppState;
use super::error::{AppError, clip};
use super::inspect::inspect;
use super::state::ServedModel;
use super::upload::{ImageUpload, ValidQuery};
use crate::detect::image_io::decode_rgb;
use crate::detect::{DetectOptions, Detection, StageTimings};

/// Query parameters of `POST /detect`; thresholds left out take [`DetectOptions::default`].
#[derive(Debug, Default, Deserialize)]
pub struct DetectQuery {
    /// `id` or `id@variant`; the default model when absent.
    pub model: Option<String>,
    pub score_threshold: Option<f32>,
    pub iou_threshold: Option<f32>,
    pub max_detections: Option<usize>,
}

impl DetectQuery {
    pub fn options(&self) -> DetectOptions {
        let d = DetectOptions::default();
        DetectOptions {
            score_threshold: self.score_threshold.unwrap_or(d.score_threshold),
            iou_threshold: self.iou_threshold.unwrap_or(d.iou_threshold),
            max_detections: self.max_detections.unwrap_or(d.max_detections),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSize {
    pub width: u32,
    pub height: u32,
}

/// The answer of `POST /detect`. Boxes are in pixels of the uploaded image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DetectResponse {
    pub model: String,
    pub variant: String,
    pub engine: String,
    pub image: ImageSize,
    pub detections: Vec<Detection>,
    /// `decode` is the image decode in the handler; `total` the whole handler, queueing for an
    /// inference slot included.
    pub timing_ms: StageTimings,
}

pub(crate) async fn detect(
    State(state): State<Arc<AppState>>,
    ValidQuery(query): ValidQuery<DetectQuery>,
    ImageUpload(bytes): ImageUpload,
) -> Result<Json<DetectResponse>, AppError> {
    let started = Instant::now();
    let model = state.find_model(query.model.as_deref())?;
    let opts = query.options();
    opts.validate()
        .map_err(|e| AppError::Unprocessable(e.to_string()))?;
    let slot = tokio::time::timeout(
        state.options().queue_timeout,
        state.inference_slots.clone().acquire_owned(),
    )
    .await
    .map_err(|_| AppError::Busy(state.options().queue_timeout))?
    .map_err(|_| AppError::Internal("the inference semaphore is closed".into()))?;
    let inflight = state.metrics.inflight();
    let job_model = Arc::clone(&model);
    // Decoding and inference are CPU-bound: on an async worker they would stall every other
    // connection that worker serves. The slot moves into the job, so it is released when the
    // work ends even if the client has gone and this handler was dropped.
    let (image, detections, mut timing_ms) = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        let _inflight = inflight;
        run_detection(&job_model, &bytes, &opts)
    })
    .await
    .map_err(|e| AppError::Internal(format!("detection task failed: {e}")))??;
    timing_ms.total = started.elapsed().as_secs_f64() * 1e3;
    model.stages.observe(&timing_ms);
    Ok(Json(DetectResponse {
        model: model.id().to_string(),
        variant: model.variant().to_string(),
        engine: model.detector.backend().engine().to_string(),
        image,
        detections,
        timing_ms,
    }))
}

fn run_detection(
    model: &ServedModel,
    bytes: &[u8],
    opts: &DetectOptions,
) -> Result<(ImageSize, Vec<Detection>, StageTimings), AppError> {
    let t0 = Instant::now();
    inspect(bytes)?;
    let img = decode_rgb(bytes)?;
    let decode_ms = t0.elapsed().as_secs_f64() * 1e3;
    let (detections, mut timings) = model.detector.detect(&img, opts)?;
    timings.decode = decode_ms;
    let size = ImageSize {
        width: img.width(),
        height: img.height(),
    };
    Ok((size, detections, timings))
}

/// One entry of `GET /v1/models`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub id: String,
    pub variant: String,
    pub engine: String,
    pub kernel: String,
    pub input: ImageSize,
    /// Number of classes.
    pub classes: usize,
    pub labels: Vec<String>,
    pub weight_bytes: usize,
    /// Whether requests that name no model get this one.
    pub default: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelList {
    /// False while models are loading; `models` is empty until then.
    pub ready: bool,
    pub models: Vec<ModelInfo>,
}

pub(crate) async fn list_models(State(state): State<Arc<AppState>>) -> Json<ModelList> {
    let models = state
        .models()
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let d = &m.detector;
            ModelInfo {
                id: m.id().to_string(),
                variant: m.variant().to_string(),
                engine: d.backend().engine().to_string(),
                kernel: d.backend().kernel().to_string(),
                input: ImageSize {
                    width: d.manifest.input.width,
                    height: d.manifest.input.height,
                },
                classes: d.manifest.labels.len(),
                labels: d.manifest.labels.clone(),
                weight_bytes: d.backend().weight_bytes(),
                default: i == 0,
            }
        })
        .collect();
    Json(ModelList {
        ready: state.is_ready(),
        models,
    })
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
    pub uptime_s: f64,
}

pub(crate) async fn healthz(State(state): State<Arc<AppState>>) -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        uptime_s: state.started.elapsed().as_secs_f64(),
    })
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Readiness {
    pub status: String,
    /// `id@variant` of each served model.
    pub models: Vec<String>,
}

pub(crate) async fn readyz(
    State(state): State<Arc<AppState>>,
) -> Result<Json<Readiness>, AppError> {
    if !state.is_ready() {
        return Err(AppError::NotReady);
    }
    Ok(Json(Readiness {
        status: "ready".into(),
        models: state.models().iter().map(|m| m.key.clone()).collect(),
    }))
}

pub(crate) async fn metrics(State(state): State<Arc<AppState>>) -> Result<Response, AppError> {
    let text = state
        .metrics
        .render()
        .map_err(|e| AppError::Internal(format!("cannot encode metrics: {e}")))?;
    let mut response = text.into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    Ok(response)
}

pub(crate) async fn not_found(method: Method, uri: Uri) -> AppError {
    AppError::NotFound(format!(
        "no route for {method} {}; routes: POST /detect, GET /v1/models, GET /healthz, \
         GET /readyz, GET /metrics",
        clip(uri.path())
    ))
}

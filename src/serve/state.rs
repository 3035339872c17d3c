//! State shared by every request: the served models, the inference slots and the metrics.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use image::{Rgb, RgbImage};
use tokio::sync::Semaphore;

use super::error::{AppError, clip};
use super::metrics::{Metrics, StageHistograms};
use crate::detect::{DetectOptions, Detector};
use crate::error::{Error, Result};

/// Limits of a server, independent of the models it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeOptions {
    /// Detections that run at once on the blocking pool.
    pub inference_threads: usize,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// How long a request waits for an inference slot before a 503.
    pub queue_timeout: Duration,
    /// Longest a request may take in all, upload included, before a 408.
    pub request_timeout: Duration,
}

pub const DEFAULT_MAX_BODY_BYTES: usize = 20 * 1024 * 1024;

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            inference_threads: default_inference_threads(),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            queue_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
        }
    }
}

/// One slot per core: inference is CPU-bound, so more slots only add contention.
pub fn default_inference_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A detector that has run one inference, so its first request pays no one-time setup.
/// Only [`warm_up`] makes one, which is what lets [`AppState::install`] promise readiness.
pub struct WarmModel {
    detector: Arc<Detector>,
}

impl WarmModel {
    pub fn detector(&self) -> &Arc<Detector> {
        &self.detector
    }
}

/// Runs one detection on a grey image of the model's input size.
pub fn warm_up(detector: Arc<Detector>) -> Result<WarmModel> {
    let input = &detector.manifest.input;
    let img = RgbImage::from_pixel(input.width, input.height, Rgb([114, 114, 114]));
    detector.detect(&img, &DetectOptions::default())?;
    Ok(WarmModel { detector })
}

/// A model as the server holds it.
pub(crate) struct ServedModel {
    pub detector: Arc<Detector>,
    /// `id@variant`.
    pub key: String,
    pub stages: StageHistograms,
}

impl ServedModel {
    pub fn id(&self) -> &str {
        &self.detector.manifest.id
    }

    pub fn variant(&self) -> &str {
        &self.detector.variant
    }
}

pub struct AppState {
    options: ServeOptions,
    /// Set once, when every model is loaded and warm; until then the server is not ready.
    models: OnceLock<Vec<Arc<ServedModel>>>,
    pub(crate) inference_slots: Arc<Semaphore>,
    pub(crate) metrics: Metrics,
    pub(crate) started: Instant,
}

impl AppState {
    /// A server state with no models yet: it answers `/healthz`, and 503 on `/readyz` and
    /// `/detect` until [`install`](Self::install) is called.
    pub fn new(options: ServeOptions) -> Self {
        let slots = options.inference_threads.max(1);
        AppState {
            options,
            models: OnceLock::new(),
            inference_slots: Arc::new(Semaphore::new(slots)),
            metrics: Metrics::new(),
            started: Instant::now(),
        }
    }

    pub fn options(&self) -> &ServeOptions {
        &self.options
    }

    pub fn is_ready(&self) -> bool {
        self.models.get().is_some()
    }

    /// Starts serving `models`; the first one answers requests that name no model. Fails when the
    /// list is empty, names a variant twice, or models were installed already.
    pub fn install(&self, models: Vec<WarmModel>) -> Result<()> {
        if models.is_empty() {
            return Err(Error::Input("no model to serve".into()));
        }
        let mut served: Vec<Arc<ServedModel>> = Vec::with_capacity(models.len());
        for WarmModel { detector } in models {
            let key = format!("{}@{}", detector.manifest.id, detector.variant);
            if served.iter().any(|m| m.key == key) {
                return Err(Error::Input(format!("model {key} is given twice")));
            }
            let backend = detector.backend();
            let stages = self.metrics.model_series(
                &detector.manifest.id,
                &detector.variant,
                backend.engine(),
                backend.kernel(),
                backend.weight_bytes(),
            );
            served.push(Arc::new(ServedModel {
                detector,
                key,
                stages,
            }));
        }
        self.models
            .set(served)
            .map_err(|_| Error::Input("models are installed already".into()))
    }

    /// Served models, the default first; empty until ready.
    pub(crate) fn models(&self) -> &[Arc<ServedModel>] {
        self.models.get().map_or(&[], Vec::as_slice)
    }

    /// The model a request names: `id@variant`, a bare `id` (its first loaded variant), or none
    /// (the default model).
    pub(crate) fn find_model(&self, name: Option<&str>) -> Result<Arc<ServedModel>, AppError> {
        let models = self.models.get().ok_or(AppError::NotReady)?;
        let found = match name {
            None | Some("") => models.first(),
            Some(name) if name.contains('@') => models.iter().find(|m| m.key == name),
            Some(id) => models.iter().find(|m| m.id() == id),
        };
        found.cloned().ok_or_else(|| {
            let known: Vec<&str> = models.iter().map(|m| m.key.as_str()).collect();
            AppError::NotFound(format!(
                "model {:?} is not served here; served models: {}",
                clip(name.unwrap_or_default()),
                known.join(", ")
            ))
        })
    }
}

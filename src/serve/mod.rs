//! `lbw serve`: detectors over HTTP (axum on tokio).
//!
//! Routes: `POST /detect` (an image as multipart field `image` or as the raw body; query
//! `model`, `score_threshold`, `iou_threshold`, `max_detections`), `GET /v1/models`,
//! `GET /healthz`, `GET /readyz` and `GET /metrics` (Prometheus text). Every error is JSON,
//! `{"error": "..."}` ([`AppError`]).
//!
//! The port is bound before models load, so an orchestrator sees `/healthz` answer at once and
//! `/readyz` answer 503 until every model is loaded and has run one inference. Decoding and
//! inference run on tokio's blocking pool, at most `inference_threads` at a time.
//!
//! To run a server in-process (tests, embedding):
//! ```no_run
//! # async fn demo() -> lbw::Result<()> {
//! use std::sync::Arc;
//! use lbw::serve::{AppState, ServeOptions, router, load_variant, warm_up};
//! let state = Arc::new(AppState::new(ServeOptions::default()));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
//! let model = warm_up(Arc::new(load_variant("yolo-fastest-voc@fp32")?))?;
//! state.install(vec![model])?;
//! axum::serve(listener, router(state)).await.expect("serve");
//! # Ok(()) }
//! ```

mod error;
mod handlers;
mod inspect;
mod metrics;
mod state;
mod upload;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::middleware::{from_fn_with_state, map_response};
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::{DefaultOnFailure, TraceLayer};
use tracing::Level;

pub use error::{AppError, ErrorBody};
pub use handlers::{
    DetectQuery, DetectResponse, Health, ImageSize, ModelInfo, ModelList, Readiness,
};
pub use metrics::STAGES;
pub use state::{
    AppState, DEFAULT_MAX_BODY_BYTES, ServeOptions, WarmModel, default_inference_threads, warm_up,
};
pub use upload::IMAGE_FIELD;

use crate::detect::{Detector, load_detector};
use crate::error::{Error, Result};

/// Variants a model spec may name: `fp32` (tract) and `lbw2` .. `lbw8` (power-of-two weights,
/// post-training, on the shift-add engine). A spec may also be the path of a `.lbw` file.
pub const VARIANTS: [&str; 8] = [
    "fp32", "lbw2", "lbw3", "lbw4", "lbw5", "lbw6", "lbw7", "lbw8",
];

fn is_lbw_file(spec: &str) -> bool {
    spec.ends_with(".lbw")
}

/// The variant served when a spec names none.
pub const DEFAULT_VARIANT: &str = "fp32";

/// What `lbw serve` runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeConfig {
    pub addr: SocketAddr,
    /// Model specs (`id` or `id@variant`); the first is the default.
    pub models: Vec<String>,
    pub options: ServeOptions,
}

/// The application: routes, error shaping, metrics, body limit, timeout and tracing.
pub fn router(state: Arc<AppState>) -> Router {
    let options = state.options().clone();
    Router::new()
        .route("/detect", post(handlers::detect))
        .route("/v1/models", get(handlers::list_models))
        .route("/healthz", get(handlers::healthz))
        .route("/readyz", get(handlers::readyz))
        .route("/metrics", get(handlers::metrics))
        .fallback(handlers::not_found)
        .layer(DefaultBodyLimit::max(options.max_body_bytes))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            options.request_timeout,
        ))
        .layer(map_response(error::json_error_bodies))
        .layer(from_fn_with_state(state.clone(), metrics::record_http))
        // 5xx answers here are mostly expected (503 while loading or busy); real failures are
        // logged with their detail by `AppError::Internal`.
        .layer(TraceLayer::new_for_http().on_failure(DefaultOnFailure::new().level(Level::WARN)))
        .with_state(state)
}

/// Splits `id[@variant]`; the variant defaults to [`DEFAULT_VARIANT`].
pub fn parse_model_spec(spec: &str) -> Result<(&str, &str)> {
    let (id, variant) = spec.split_once('@').unwrap_or((spec, DEFAULT_VARIANT));
    if id.is_empty() || variant.is_empty() || variant.contains('@') {
        return Err(Error::Input(format!(
            "model {spec:?} is not of the form ID or ID@VARIANT"
        )));
    }
    Ok((id, variant))
}

/// Loads one model variant from its spec (`id` or `id@variant`). Every variant the server can
/// serve is built here, so a new one (a shift-add engine, a `.lbw` file) is one more arm.
pub fn load_variant(spec: &str) -> Result<Detector> {
    if is_lbw_file(spec) {
        return load_detector(spec);
    }
    let (id, variant) = parse_model_spec(spec)?;
    match variant {
        "fp32" => load_detector(id),
        v if VARIANTS.contains(&v) => crate::detect::pipeline::load_ptq_detector(id, v),
        other => Err(unknown_variant(spec, other)),
    }
}

fn unknown_variant(spec: &str, variant: &str) -> Error {
    Error::Input(format!(
        "model {spec:?}: unknown variant {variant:?}; available variants: {}",
        VARIANTS.join(", ")
    ))
}

/// Checks model specs without loading anything: syntax, known variants, no repeats. Returns the
/// `id@variant` key of each.
pub fn check_model_specs(specs: &[String]) -> Result<Vec<String>> {
    if specs.is_empty() {
        return Err(Error::Input("no model to serve".into()));
    }
    let mut keys: Vec<String> = Vec::with_capacity(specs.len());
    for spec in specs {
        if is_lbw_file(spec) {
            if keys.contains(spec) {
                return Err(Error::Input(format!("model {spec} is given twice")));
            }
            keys.push(spec.clone());
            continue;
        }
        let (id, variant) = parse_model_spec(spec)?;
        if !VARIANTS.contains(&variant) {
            return Err(unknown_variant(spec, variant));
        }
        let key = format!("{id}@{variant}");
        if keys.contains(&key) {
            return Err(Error::Input(format!("model {key} is given twice")));
        }
        keys.push(key);
    }
    Ok(keys)
}

/// Loads, warms up and installs `specs` into `state`, telling `progress` about each step.
/// Blocking: call it from a blocking thread.
pub fn load_models(state: &AppState, specs: &[String], progress: &dyn Fn(&str)) -> Result<()> {
    // Reject a bad or repeated spec before spending seconds loading the others.
    let keys = check_model_specs(specs)?;
    let mut warm = Vec::with_capacity(specs.len());
    for (spec, key) in specs.iter().zip(&keys) {
        progress(&format!("loading {key}: reading and verifying model files"));
        let t0 = Instant::now();
        let detector = load_variant(spec).map_err(|e| match e {
            Error::Input(m) => Error::Input(format!("cannot load model {key}: {m}")),
            other => Error::Model(format!("cannot load model {key}: {other}")),
        })?;
        let load_ms = t0.elapsed().as_secs_f64() * 1e3;
        let backend = detector.backend();
        tracing::info!(
            model = %detector.manifest.id,
            variant = %detector.variant,
            engine = backend.engine(),
            kernel = backend.kernel(),
            weight_bytes = backend.weight_bytes(),
            load_ms = format_args!("{load_ms:.1}"),
            "model loaded"
        );
        progress(&format!(
            "loaded {key} in {:.2} s (engine {}, kernel {}, {:.2} MiB of weights); warming up",
            load_ms / 1e3,
            backend.engine(),
            backend.kernel(),
            backend.weight_bytes() as f64 / (1024.0 * 1024.0)
        ));
        let t1 = Instant::now();
        warm.push(
            warm_up(Arc::new(detector)).map_err(|e| {
                Error::Model(format!("model {key} failed its warm-up inference: {e}"))
            })?,
        );
        progress(&format!(
            "warmed up {key} in {:.0} ms",
            t1.elapsed().as_secs_f64() * 1e3
        ));
    }
    state.install(warm)?;
    progress(&format!(
        "ready: serving {} (default {})",
        keys.join(", "),
        keys[0]
    ));
    Ok(())
}

/// Serves on a bound listener until `shutdown` completes, loading `models` in the background
/// meanwhile. A model that fails to load stops the server and is the error returned; a shutdown
/// requested while loading is not an error.
pub async fn serve_on(
    listener: TcpListener,
    models: Vec<String>,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
    progress: impl Fn(&str) + Send + Sync + 'static,
) -> Result<()> {
    let addr = listener
        .local_addr()
        .map_err(|e| Error::Input(format!("cannot read the listening address: {e}")))?;
    // A typo in a spec fails at once, before the port is announced.
    check_model_specs(&models)?;
    let state = Arc::new(AppState::new(options));
    let progress = Arc::new(progress);
    progress(&format!(
        "listening on http://{addr} (/readyz answers 503 until the models are loaded)"
    ));

    let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<Error>();
    let loader_state = Arc::clone(&state);
    let loader_progress = Arc::clone(&progress);
    tokio::task::spawn_blocking(move || {
        let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            load_models(&loader_state, &models, &*loader_progress)
        }))
        .unwrap_or_else(|_| Err(Error::Model("model loading panicked".into())));
        if let Err(e) = loaded {
            // The receiver is gone only when the server has already stopped.
            let _ = failed_tx.send(e);
        }
    });

    let failure: Arc<Mutex<Option<Error>>> = Arc::default();
    let failure_slot = Arc::clone(&failure);
    let stop = async move {
        tokio::select! {
            () = shutdown => {}
            Ok(e) = failed_rx => {
                if let Ok(mut slot) = failure_slot.lock() {
                    *slot = Some(e);
                }
            }
        }
    };
    axum::serve(listener, router(state))
        .with_graceful_shutdown(stop)
        .await
        .map_err(|e| Error::io(format!("http://{addr}"), e))?;
    let failed = failure.lock().ok().and_then(|mut slot| slot.take());
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// `lbw serve`: binds `config.addr`, prints progress to stderr, and serves until ctrl-c or
/// SIGTERM, letting in-flight requests finish.
pub async fn run(config: ServeConfig) -> Result<()> {
    let listener = TcpListener::bind(config.addr)
        .await
        .map_err(|e| Error::Input(format!("cannot listen on {}: {e}", config.addr)))?;
    serve_on(
        listener,
        config.models,
        config.options,
        shutdown_signal(),
        |line| eprintln!("{line}"),
    )
    .await?;
    eprintln!("server stopped");
    Ok(())
}

/// Completes on ctrl-c, or on SIGTERM (what Docker and Kubernetes send to stop a container).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            // Without a handler, never complete rather than shut down at once.
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sig) => {
                sig.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("ctrl-c received, shutting down"),
        () = terminate => tracing::info!("SIGTERM received, shutting down"),
    }
}

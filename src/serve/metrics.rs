//! Prometheus metrics of one server. Every [`AppState`](super::AppState) owns its own registry,
//! so servers started side by side (tests, several listeners in one process) never share counts.
//!
//! Label values come from fixed sets only (route templates, a handful of methods, status codes,
//! loaded models), so the number of series stays bounded whatever clients send.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use super::AppState;

/// The `stage` label values of `lbw_inference_duration_seconds`, in [`StageHistograms`] order.
pub const STAGES: [&str; 5] = ["decode", "preprocess", "inference", "postprocess", "total"];

/// Route label of requests that matched no route.
const OTHER: &str = "other";

pub(crate) struct Metrics {
    registry: Registry,
    http_requests: IntCounterVec,
    http_duration: HistogramVec,
    inference_duration: HistogramVec,
    weight_bytes: IntGaugeVec,
    resident_memory: IntGauge,
    inflight: IntGauge,
    page_size: u64,
}

/// One model's stage histograms, resolved once at install so a request does no label lookups.
pub(crate) struct StageHistograms([Histogram; 5]);

impl StageHistograms {
    pub fn observe(&self, t: &crate::detect::StageTimings) {
        let ms = [t.decode, t.preprocess, t.inference, t.postprocess, t.total];
        for (h, v) in self.0.iter().zip(ms) {
            h.observe(v / 1e3);
        }
    }
}

/// Counts one running inference for as long as it lives, including when the work panics.
pub(crate) struct InflightGuard(IntGauge);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Metrics {
    pub fn new() -> Self {
        // Registration only fails on a duplicate or malformed name; the names are constants and
        // the registry is new, so a failure is a bug caught by the first test that builds a state.
        Self::try_new().expect("metric definitions are valid and registered once")
    }

    fn try_new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let http_requests = IntCounterVec::new(
            Opts::new("lbw_http_requests_total", "HTTP requests answered"),
            &["route", "method", "status"],
        )?;
        let http_duration = HistogramVec::new(
            HistogramOpts::new(
                "lbw_http_request_duration_seconds",
                "Time from request to response headers",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            &["route"],
        )?;
        let inference_duration = HistogramVec::new(
            HistogramOpts::new(
                "lbw_inference_duration_seconds",
                "Time of each stage of one detection",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
            ]),
            &["model", "variant", "engine", "kernel", "stage"],
        )?;
        let weight_bytes = IntGaugeVec::new(
            Opts::new(
                "lbw_model_weight_bytes",
                "Bytes the loaded variant holds for weights",
            ),
            &["model", "variant", "engine"],
        )?;
        let resident_memory = IntGauge::new(
            "lbw_process_resident_memory_bytes",
            "Resident set size of the server process",
        )?;
        let inflight = IntGauge::new(
            "lbw_inflight_inference",
            "Detections running on the inference pool",
        )?;
        registry.register(Box::new(http_requests.clone()))?;
        registry.register(Box::new(http_duration.clone()))?;
        registry.register(Box::new(inference_duration.clone()))?;
        registry.register(Box::new(weight_bytes.clone()))?;
        registry.register(Box::new(resident_memory.clone()))?;
        registry.register(Box::new(inflight.clone()))?;
        Ok(Metrics {
            registry,
            http_requests,
            http_duration,
            inference_duration,
            weight_bytes,
            resident_memory,
            inflight,
            page_size: page_size().unwrap_or(4096),
        })
    }

    pub fn model_series(
        &self,
        model: &str,
        variant: &str,
        engine: &str,
        kernel: &str,
        weight_bytes: usize,
    ) -> StageHistograms {
        self.weight_bytes
            .with_label_values(&[model, variant, engine])
            .set(i64::try_from(weight_bytes).unwrap_or(i64::MAX));
        StageHistograms(STAGES.map(|stage| {
            self.inference_duration
                .with_label_values(&[model, variant, engine, kernel, stage])
        }))
    }

    pub fn inflight(&self) -> InflightGuard {
        self.inflight.inc();
        InflightGuard(self.inflight.clone())
    }

    /// The text exposition of every metric, with the memory gauge read now.
    pub fn render(&self) -> Result<String, prometheus::Error> {
        let rss = resident_pages().map_or(0, |pages| pages.saturating_mul(self.page_size));
        self.resident_memory
            .set(i64::try_from(rss).unwrap_or(i64::MAX));
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf)?;
        String::from_utf8(buf).map_err(|e| prometheus::Error::Msg(e.to_string()))
    }
}

/// Resident pages, the second field of `/proc/self/statm`; `None` off Linux.
fn resident_pages() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    statm.split_whitespace().nth(1)?.parse().ok()
}

/// The kernel's page size from the auxiliary vector (`AT_PAGESZ`): statm counts pages, and pages
/// are 16 or 64 KiB on some ARM systems, so 4 KiB cannot be assumed.
fn page_size() -> Option<u64> {
    const AT_PAGESZ: usize = 6;
    const WORD: usize = std::mem::size_of::<usize>();
    let auxv = std::fs::read("/proc/self/auxv").ok()?;
    auxv.chunks_exact(2 * WORD).find_map(|entry| {
        let (key, value) = entry.split_at(WORD);
        let key = usize::from_ne_bytes(key.try_into().ok()?);
        let value = usize::from_ne_bytes(value.try_into().ok()?);
        (key == AT_PAGESZ).then_some(value as u64)
    })
}

fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::HEAD => "HEAD",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => OTHER,
    }
}

/// Middleware counting and timing every request under its route template.
pub(crate) async fn record_http(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| OTHER.to_string(), |p| p.as_str().to_string());
    let method = method_label(request.method());
    let response = next.run(request).await;
    let metrics = &state.metrics;
    metrics
        .http_requests
        .with_label_values(&[route.as_str(), method, response.status().as_str()])
        .inc();
    metrics
        .http_duration
        .with_label_values(&[route.as_str()])
        .observe(started.elapsed().as_secs_f64());
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_gauge_reads_the_process_size() {
        let text = Metrics::new().render().expect("renders");
        let rss: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix("lbw_process_resident_memory_bytes "))
            .and_then(|v| v.trim().parse().ok())
            .expect("gauge present");
        if cfg!(target_os = "linux") {
            assert!(rss > 1e6, "resident memory {rss} bytes");
        }
    }
}

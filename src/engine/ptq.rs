//! Post-training quantization end to end, in memory: power-of-two weights, activation grids from
//! real images, and the shift-add engine that runs them (what `lbw bench --variant lbwB` and
//! `lbw calibrate` use).

use std::path::Path;

use crate::detect::image_io::load_rgb;
use crate::detect::preprocess::preprocess;
use crate::engine::quant_params::{ActivationScales, RangeObserver, calibrate};
use crate::engine::shift_add::{EngineOptions, ShiftAddEngine};
use crate::error::{Error, Result};
use crate::model::{Graph, Manifest, Tensor};
use crate::quant::{QuantizeOptions, QuantizedModel, quantize_graph};

/// The preprocessed inputs of the first `limit` images (sorted by file name) in `dir`.
pub fn calibration_inputs(manifest: &Manifest, dir: &Path, limit: usize) -> Result<Vec<Tensor>> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png"))
        })
        .collect();
    files.sort();
    files.truncate(limit);
    if files.is_empty() {
        return Err(Error::Input(format!(
            "no .jpg or .png images in {}",
            dir.display()
        )));
    }
    files
        .iter()
        .map(|f| Ok(preprocess(&load_rgb(f)?, &manifest.input).0))
        .collect()
}

/// A quantized model, its activation grids and the engine built from them.
pub struct PtqEngine {
    pub quantized: QuantizedModel,
    pub scales: ActivationScales,
    pub engine: ShiftAddEngine,
}

/// Quantizes `graph`'s conv weights, calibrates activations on `images` with those weights, and
/// plans the shift-add engine.
pub fn build_ptq_engine(
    graph: &Graph,
    quant: &QuantizeOptions,
    images: &[Tensor],
    observer: RangeObserver,
    engine: &EngineOptions,
) -> Result<PtqEngine> {
    let quantized = quantize_graph(graph, quant)?;
    let simulated = quantized.simulated_graph()?;
    let scales = calibrate(&simulated, images.iter().cloned(), observer)?;
    let engine = ShiftAddEngine::new(graph, &quantized.tensors, &scales, engine)?;
    Ok(PtqEngine {
        quantized,
        scales,
        engine,
    })
}

//! Post-training quantization end to end, in memory: power-of-two weights, activation grids from
//! real images, and the shift-add engine that runs them (what `lbw bench --variant lbwB`,
//! `lbw calibrate` and `ID@lbwB` model references use). Images are read and preprocessed by the
//! caller ([`crate::detect::pipeline::calibration_inputs`]).

use crate::engine::quant_params::{ActivationScales, RangeObserver, calibrate};
use crate::engine::shift_add::{EngineOptions, ShiftAddEngine};
use crate::error::Result;
use crate::model::{Graph, Tensor};
use crate::quant::{Bits, Method, QuantizeOptions, QuantizedModel, quantize_graph};

/// Parses a variant name `lbwB` (`lbw6`) into its bit-width.
pub fn parse_lbw_variant(variant: &str) -> Option<Bits> {
    variant
        .strip_prefix("lbw")
        .and_then(|b| b.parse::<u8>().ok())
        .and_then(|b| Bits::new(b).ok())
}

/// The default post-training quantization of a variant: per-channel alphas, the LBW-Net rule
/// (ternary at 2 bits, where it is exact), every conv quantized.
pub fn default_quantize_options(bits: Bits) -> QuantizeOptions {
    QuantizeOptions {
        bits,
        method: if bits.get() == 2 {
            Method::Ternary
        } else {
            Method::Lbw
        },
        param: None,
        per_channel: true,
        keep_full_precision: vec![],
    }
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

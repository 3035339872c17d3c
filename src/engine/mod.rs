//! Executors of the internal graph.
//!
//! Every executor implements [`Backend`]: one NCHW float image in, the graph's raw outputs out.
//! * [`tract_fp32::TractFp32`] runs the FP32 baseline through tract-onnx (the graph exported to ONNX).
//! * [`reference::ReferenceInterpreter`] is the plain f32 interpreter every other engine is checked
//!   against; with fake quantization it is the FP32 simulation of the integer engine.
//! * [`shift_add::ShiftAddEngine`] runs power-of-two weights on 8-bit activations with
//!   multiplication-free conv kernels ([`kernels`]); [`quant_params`] holds its activation grids
//!   and their calibration. Design and numbers: docs/ENGINE.md.

pub mod kernels;
pub mod ptq;
pub mod quant_params;
pub mod reference;
pub mod shift_add;
pub mod tract_fp32;

use crate::error::Result;
use crate::model::Tensor;

/// A loaded, ready-to-run network. Implementations are immutable after construction and shared
/// between inference threads.
pub trait Backend: Send + Sync {
    /// Engine name used in metrics labels and benchmark columns (`tract`, `shift-add`, ...).
    fn engine(&self) -> &'static str;
    /// Kernel family chosen at load (`tract`, `scalar`, `avx2`, `avx512bw`, ...).
    fn kernel(&self) -> &str;
    /// Runs one `[1, C, H, W]` input and returns the graph outputs in graph order.
    fn run(&self, input: Tensor) -> Result<Vec<Tensor>>;
    /// Bytes held for weights (what the variant costs in memory).
    fn weight_bytes(&self) -> usize;
}

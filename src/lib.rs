//! lbw: low bit-width (zero or signed power-of-two weight) object detectors.
//!
//! Data flows one way through the modules: [`model`] (import, graph, manifests, `.lbw` files) →
//! [`quant`] (quantizers) → [`engine`] (executors and kernels) → [`detect`] (pre- and
//! post-processing) → [`eval`] (mAP) and [`serve`] (HTTP). [`cli`] wires them to the `lbw` binary.

pub mod cli;
pub mod detect;
pub mod engine;
pub mod error;
pub mod eval;
pub mod model;
pub mod paths;
pub mod quant;
pub mod serve;
pub mod train;

pub use error::{Error, Result};

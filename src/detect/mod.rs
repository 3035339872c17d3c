//! Detection: image pre-processing, head decoders, NMS and the detector pipeline.

pub mod types;

pub use types::{Detection, ImageDetections, iou};

//! Detection: image decoding and pre-processing, head decoders, NMS and the detector pipeline.

pub mod decode;
pub mod image_io;
pub mod nms;
pub mod pipeline;
pub mod preprocess;
pub mod types;

pub use pipeline::{DetectOptions, Detector, StageTimings, load_detector};
pub use types::{Detection, ImageDetections, iou};

//! Models: the internal graph, importers (darknet, ONNX), ONNX export and manifests.

pub mod graph;

pub use graph::{Conv, Graph, Node, Op, Pool, Tensor};

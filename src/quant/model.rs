//! Whole-graph post-training quantization, its report, and the FP32 simulation of the result.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Serialize;

use super::{Bits, Method, QuantizedTensor, relative_error};
use crate::error::{Error, Result};
use crate::model::{Conv, Graph, Node, Tensor};

/// What to quantize and how.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizeOptions {
    pub bits: Bits,
    pub method: Method,
    /// The free parameter of [`Method::Lbw`] (`None`: its default); must be `None` for the others.
    pub param: Option<f32>,
    /// One alpha per output channel instead of one per tensor.
    pub per_channel: bool,
    /// Convs left at full precision, by node name or weight tensor name (typically the first conv,
    /// whose input is the raw image, and the detection heads). A name that matches no conv is an
    /// error, so a typo cannot silently quantize a layer meant to be kept.
    pub keep_full_precision: Vec<String>,
}

/// The shape class of a conv, which decides how an engine runs it and how it tolerates quantization.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerKind {
    /// 1x1 kernel (grouped or not).
    Pointwise,
    /// One input channel per group, `groups > 1`.
    Depthwise,
    /// `k x k` kernel, `groups > 1`, several input channels per group.
    Grouped,
    /// `k x k` kernel, `groups = 1`.
    Dense,
}

impl LayerKind {
    pub fn of(conv: &Conv, weight_shape: &[usize]) -> LayerKind {
        let per_group_in = weight_shape.get(1).copied().unwrap_or(0);
        if conv.groups > 1 && per_group_in == 1 {
            LayerKind::Depthwise
        } else if conv.kernel == [1, 1] {
            LayerKind::Pointwise
        } else if conv.groups > 1 {
            LayerKind::Grouped
        } else {
            LayerKind::Dense
        }
    }
}

impl fmt::Display for LayerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LayerKind::Pointwise => "1x1",
            LayerKind::Depthwise => "depthwise",
            LayerKind::Grouped => "kxk grouped",
            LayerKind::Dense => "dense",
        })
    }
}

/// One conv layer in the report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LayerReport {
    /// The conv node's name.
    pub layer: String,
    pub weight: String,
    pub shape: Vec<usize>,
    pub kind: LayerKind,
    pub groups: usize,
    /// False for layers kept at full precision.
    pub quantized: bool,
    /// Empty for kept layers; one, or one per output channel.
    pub alphas: Vec<f32>,
    /// `||W - alpha Q|| / ||W||` (0 for kept layers).
    pub relative_error: f64,
    /// Fraction of weights quantized to zero (0 for kept layers).
    pub zero_fraction: f64,
    pub fp32_bytes: usize,
    /// Bytes as stored: packed codes plus alphas, or 4 per weight for kept layers.
    pub packed_bytes: usize,
}

/// Per-layer rows and totals over all conv weights (biases are not counted: they stay FP32 and are
/// a fraction of a percent of a detector's parameters).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QuantReport {
    pub bits: u8,
    pub method: Method,
    pub param: Option<f32>,
    pub per_channel: bool,
    pub layers: Vec<LayerReport>,
    pub quantized_layers: usize,
    pub kept_layers: usize,
    /// Conv weight bytes at FP32.
    pub fp32_bytes: usize,
    /// Conv weight bytes as stored: packed quantized layers plus FP32 kept layers.
    pub packed_bytes: usize,
    /// `fp32_bytes / packed_bytes`.
    pub compression_ratio: f64,
}

/// A graph with (some of) its conv weights quantized.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizedModel {
    /// The FP32 graph it was made from, unchanged.
    pub graph: Graph,
    /// Quantized conv weights by tensor name.
    pub tensors: BTreeMap<String, QuantizedTensor>,
    pub options: QuantizeOptions,
    pub report: QuantReport,
}

impl QuantizedModel {
    /// The graph with every quantized conv weight replaced by `alpha * Q` in FP32: what a quantized
    /// model computes, for scoring it on any FP32 backend.
    pub fn simulated_graph(&self) -> Result<Graph> {
        simulate_graph(&self.graph, &self.tensors)
    }
}

/// Quantizes every conv weight of `graph` not named in `keep_full_precision`.
pub fn quantize_graph(graph: &Graph, options: &QuantizeOptions) -> Result<QuantizedModel> {
    let quantizer = options.method.quantizer(options.param)?;
    let convs: Vec<(&Node, &Conv)> = graph.convs().collect();
    let keep: BTreeSet<&str> = options
        .keep_full_precision
        .iter()
        .map(String::as_str)
        .collect();
    for name in &keep {
        if !convs
            .iter()
            .any(|(n, c)| n.name == *name || c.weight == *name)
        {
            return Err(Error::Input(format!(
                "--keep {name:?} names no conv layer or conv weight of {}",
                graph.name
            )));
        }
    }
    let mut tensors = BTreeMap::new();
    let mut layers = Vec::with_capacity(convs.len());
    for (node, conv) in convs {
        let w = graph.weight(&conv.weight)?;
        if w.shape.len() != 4 {
            return Err(Error::Model(format!(
                "conv {} has a weight of shape {:?}, expected [out, in/groups, kh, kw]",
                node.name, w.shape
            )));
        }
        let kept = keep.contains(node.name.as_str()) || keep.contains(conv.weight.as_str());
        let fp32_bytes = 4 * w.len();
        let mut row = LayerReport {
            layer: node.name.clone(),
            weight: conv.weight.clone(),
            shape: w.shape.clone(),
            kind: LayerKind::of(conv, &w.shape),
            groups: conv.groups,
            quantized: !kept,
            alphas: vec![],
            relative_error: 0.0,
            zero_fraction: 0.0,
            fp32_bytes,
            packed_bytes: fp32_bytes,
        };
        if !kept {
            // A weight shared by several convs is quantized once.
            if !tensors.contains_key(&conv.weight) {
                let q = quantizer
                    .quantize_tensor(&w.data, &w.shape, options.bits, options.per_channel)
                    .map_err(|e| {
                        Error::Model(format!("quantizing {} ({}): {e}", node.name, conv.weight))
                    })?;
                tensors.insert(conv.weight.clone(), q);
            }
            let q = &tensors[&conv.weight];
            row.alphas = q.alphas.clone();
            row.relative_error = relative_error(&w.data, q.objective);
            row.zero_fraction = q.zero_fraction();
            row.packed_bytes = q.packed_bytes();
        }
        layers.push(row);
    }
    // Totals count each weight tensor once, even if shared.
    let mut seen = BTreeSet::new();
    let (mut fp32_bytes, mut packed_bytes) = (0, 0);
    for row in &layers {
        if seen.insert(row.weight.as_str()) {
            fp32_bytes += row.fp32_bytes;
            packed_bytes += row.packed_bytes;
        }
    }
    let report = QuantReport {
        bits: options.bits.get(),
        method: options.method,
        param: options.param,
        per_channel: options.per_channel,
        quantized_layers: layers.iter().filter(|r| r.quantized).count(),
        kept_layers: layers.iter().filter(|r| !r.quantized).count(),
        layers,
        fp32_bytes,
        packed_bytes,
        compression_ratio: if packed_bytes > 0 {
            fp32_bytes as f64 / packed_bytes as f64
        } else {
            1.0
        },
    };
    Ok(QuantizedModel {
        graph: graph.clone(),
        tensors,
        options: options.clone(),
        report,
    })
}

/// A copy of `graph` whose named weights are replaced by `alpha * Q` (the FP32 simulation of a
/// quantized model). Every quantized tensor must replace a graph tensor of the same shape.
pub fn simulate_graph(graph: &Graph, tensors: &BTreeMap<String, QuantizedTensor>) -> Result<Graph> {
    let mut out = graph.clone();
    for (name, q) in tensors {
        let slot = out.weights.get_mut(name).ok_or_else(|| {
            Error::Model(format!(
                "quantized tensor {name:?} is not a tensor of {}",
                graph.name
            ))
        })?;
        if slot.shape != q.shape {
            return Err(Error::Model(format!(
                "quantized tensor {name:?} has shape {:?}, the graph's has {:?}",
                q.shape, slot.shape
            )));
        }
        *slot = Tensor {
            shape: q.shape.clone(),
            data: q.dequantize(),
        };
    }
    Ok(out)
}

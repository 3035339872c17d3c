//! The internal graph every stage of the pipeline consumes.
//!
//! It is deliberately ONNX-shaped (named values, one output per node, topological order) so it can be
//! written back out as ONNX for tract, but every constant that ONNX passes as a tensor input (reshape
//! targets, gather indices, slice bounds, resize scales, pads) is folded into an explicit attribute,
//! and BatchNorm is always folded into the preceding convolution. What is left as tensors are the
//! trainable, quantizable parameters: conv weights and biases, referenced by name.

use std::collections::{BTreeMap, HashMap};

use crate::error::{Error, Result};

/// A dense float32 tensor in row-major (C) order.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(Error::Model(format!(
                "tensor of shape {shape:?} needs {n} values, got {}",
                data.len()
            )));
        }
        Ok(Tensor { shape, data })
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

/// A 2-D convolution. Input and output are NCHW; the weight is `[out, in / groups, kh, kw]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Conv {
    /// Name of the weight tensor in [`Graph::weights`].
    pub weight: String,
    /// Name of the bias tensor (`[out]`), if any.
    pub bias: Option<String>,
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    /// Padding as `[top, left, bottom, right]` (ONNX order is `[top, left, bottom, right]` too).
    pub pads: [usize; 4],
    pub dilation: [usize; 2],
    pub groups: usize,
}

/// Pooling window parameters shared by max and average pooling.
#[derive(Debug, Clone, PartialEq)]
pub struct Pool {
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    /// `[top, left, bottom, right]`.
    pub pads: [usize; 4],
}

#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    Conv(Conv),
    Relu,
    LeakyRelu {
        alpha: f32,
    },
    Sigmoid,
    /// Element-wise product of two tensors of identical shape (SiLU is `Sigmoid` then `Mul`).
    Mul,
    /// Element-wise sum of two tensors of identical shape (darknet `[shortcut]`, residuals).
    Add,
    Concat {
        axis: usize,
    },
    /// Nearest-neighbour upsampling by integer factors (ONNX Resize, asymmetric, floor).
    ResizeNearest {
        scale: [usize; 2],
    },
    MaxPool(Pool),
    /// Average pooling; padded cells count in the divisor only when `count_include_pad`.
    AvgPool {
        pool: Pool,
        count_include_pad: bool,
    },
    /// Constant padding of the spatial axes of an NCHW tensor: `[top, left, bottom, right]`.
    Pad {
        pads: [usize; 4],
        value: f32,
    },
    /// ONNX Reshape semantics: `0` copies the input dimension, `-1` is inferred.
    Reshape {
        shape: Vec<i64>,
    },
    Transpose {
        perm: Vec<usize>,
    },
    /// Gather along `axis` with constant indices. `scalar` removes the axis (a rank-0 index).
    Gather {
        axis: usize,
        indices: Vec<i64>,
        scalar: bool,
    },
    /// ONNX Slice with constant bounds, already clamped to valid ranges at import.
    Slice {
        axes: Vec<usize>,
        starts: Vec<i64>,
        ends: Vec<i64>,
        steps: Vec<i64>,
    },
    Softmax {
        axis: usize,
    },
}

impl Op {
    /// The ONNX operator name, used in messages and for export.
    pub fn onnx_name(&self) -> &'static str {
        match self {
            Op::Conv(_) => "Conv",
            Op::Relu => "Relu",
            Op::LeakyRelu { .. } => "LeakyRelu",
            Op::Sigmoid => "Sigmoid",
            Op::Mul => "Mul",
            Op::Add => "Add",
            Op::Concat { .. } => "Concat",
            Op::ResizeNearest { .. } => "Resize",
            Op::MaxPool(_) => "MaxPool",
            Op::AvgPool { .. } => "AveragePool",
            Op::Pad { .. } => "Pad",
            Op::Reshape { .. } => "Reshape",
            Op::Transpose { .. } => "Transpose",
            Op::Gather { .. } => "Gather",
            Op::Slice { .. } => "Slice",
            Op::Softmax { .. } => "Softmax",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub name: String,
    pub op: Op,
    pub inputs: Vec<String>,
    pub output: String,
}

/// A detector network: one NCHW image input, raw head outputs, nodes in topological order.
#[derive(Debug, Clone, PartialEq)]
pub struct Graph {
    pub name: String,
    pub input: String,
    /// Fixed input shape `[1, 3, H, W]`.
    pub input_shape: Vec<usize>,
    pub outputs: Vec<String>,
    pub nodes: Vec<Node>,
    pub weights: BTreeMap<String, Tensor>,
}

impl Graph {
    /// The convolution nodes, in execution order.
    pub fn convs(&self) -> impl Iterator<Item = (&Node, &Conv)> {
        self.nodes.iter().filter_map(|n| match &n.op {
            Op::Conv(c) => Some((n, c)),
            _ => None,
        })
    }

    pub fn weight(&self, name: &str) -> Result<&Tensor> {
        self.weights
            .get(name)
            .ok_or_else(|| Error::Model(format!("graph has no tensor named {name:?}")))
    }

    /// Number of float parameters (conv weights and biases).
    pub fn parameter_count(&self) -> usize {
        self.weights.values().map(Tensor::len).sum()
    }

    /// Multiply-accumulate count of all convolutions for one image.
    pub fn conv_macs(&self) -> Result<u64> {
        let shapes = self.infer_shapes()?;
        let mut total = 0u64;
        for (node, conv) in self.convs() {
            let out = &shapes[&node.output];
            let w = &self.weight(&conv.weight)?.shape;
            let per_output: usize = w[1..].iter().product();
            total = total.saturating_add(
                (out.iter().product::<usize>() as u64).saturating_mul(per_output as u64),
            );
        }
        Ok(total)
    }

    /// Checks references and computes the shape of every value. This is also the graph's validator:
    /// an imported or loaded graph that passes it can be executed by any backend.
    pub fn infer_shapes(&self) -> Result<HashMap<String, Vec<usize>>> {
        let mut shapes: HashMap<String, Vec<usize>> = HashMap::new();
        if self.input_shape.len() != 4 || self.input_shape.contains(&0) {
            return Err(Error::Model(format!(
                "input shape must be [1, C, H, W], got {:?}",
                self.input_shape
            )));
        }
        checked_volume(&self.input_shape).map_err(Error::Model)?;
        shapes.insert(self.input.clone(), self.input_shape.clone());
        for node in &self.nodes {
            let ins: Vec<&Vec<usize>> = node
                .inputs
                .iter()
                .map(|i| {
                    shapes.get(i).ok_or_else(|| {
                        Error::Model(format!(
                            "node {} ({}) reads {i:?}, which is not computed before it",
                            node.name,
                            node.op.onnx_name()
                        ))
                    })
                })
                .collect::<Result<_>>()?;
            let out = self.node_output_shape(node, &ins).map_err(|e| {
                Error::Model(format!("node {} ({}): {e}", node.name, node.op.onnx_name()))
            })?;
            if shapes.insert(node.output.clone(), out).is_some() {
                return Err(Error::Model(format!(
                    "value {:?} is written twice",
                    node.output
                )));
            }
        }
        for o in &self.outputs {
            if !shapes.contains_key(o) {
                return Err(Error::Model(format!(
                    "graph output {o:?} is never computed"
                )));
            }
        }
        Ok(shapes)
    }

    pub(crate) fn node_output_shape(
        &self,
        node: &Node,
        ins: &[&Vec<usize>],
    ) -> std::result::Result<Vec<usize>, String> {
        let out = self.node_output_shape_unchecked(node, ins)?;
        checked_volume(&out)
    }

    fn node_output_shape_unchecked(
        &self,
        node: &Node,
        ins: &[&Vec<usize>],
    ) -> std::result::Result<Vec<usize>, String> {
        let arity = |n: usize| -> std::result::Result<(), String> {
            if ins.len() == n {
                Ok(())
            } else {
                Err(format!("expects {n} inputs, has {}", ins.len()))
            }
        };
        let rank4 = |s: &Vec<usize>| -> std::result::Result<(), String> {
            if s.len() == 4 {
                Ok(())
            } else {
                Err(format!("expects a rank-4 input, got {s:?}"))
            }
        };
        match &node.op {
            Op::Conv(c) => {
                arity(1)?;
                let x = ins[0];
                rank4(x)?;
                let w = &self.weight(&c.weight).map_err(|e| e.to_string())?.shape;
                if w.len() != 4
                    || c.groups == 0
                    || !x[1].is_multiple_of(c.groups)
                    || !w[0].is_multiple_of(c.groups)
                {
                    return Err(format!(
                        "weight {w:?} and groups {} do not fit input {x:?}",
                        c.groups
                    ));
                }
                if w[1] * c.groups != x[1] || [w[2], w[3]] != c.kernel {
                    return Err(format!(
                        "weight {w:?} does not fit input {x:?} with groups {}",
                        c.groups
                    ));
                }
                if let Some(b) = &c.bias {
                    let b = &self.weight(b).map_err(|e| e.to_string())?.shape;
                    if b.iter().product::<usize>() != w[0] {
                        return Err(format!(
                            "bias {b:?} does not match {} output channels",
                            w[0]
                        ));
                    }
                }
                let h = window_out(
                    x[2],
                    c.kernel[0],
                    c.stride[0],
                    c.pads[0] + c.pads[2],
                    c.dilation[0],
                )?;
                let wd = window_out(
                    x[3],
                    c.kernel[1],
                    c.stride[1],
                    c.pads[1] + c.pads[3],
                    c.dilation[1],
                )?;
                Ok(vec![x[0], w[0], h, wd])
            }
            Op::Relu | Op::LeakyRelu { .. } | Op::Sigmoid => {
                arity(1)?;
                Ok(ins[0].clone())
            }
            Op::Mul | Op::Add => {
                arity(2)?;
                if ins[0] != ins[1] {
                    return Err(format!(
                        "operand shapes differ: {:?} vs {:?}",
                        ins[0], ins[1]
                    ));
                }
                Ok(ins[0].clone())
            }
            Op::Concat { axis } => {
                if ins.is_empty() {
                    return Err("has no inputs".into());
                }
                let mut out = ins[0].clone();
                if *axis >= out.len() {
                    return Err(format!("axis {axis} out of range for {out:?}"));
                }
                out[*axis] = 0;
                for s in ins {
                    if s.len() != out.len()
                        || s.iter()
                            .enumerate()
                            .any(|(i, &d)| i != *axis && d != out[i])
                    {
                        return Err(format!(
                            "inputs {:?} and {s:?} cannot be concatenated on axis {axis}",
                            ins[0]
                        ));
                    }
                    out[*axis] = out[*axis].checked_add(s[*axis]).ok_or(OVERFLOW)?;
                }
                Ok(out)
            }
            Op::ResizeNearest { scale } => {
                arity(1)?;
                rank4(ins[0])?;
                let x = ins[0];
                if scale[0] == 0 || scale[1] == 0 {
                    return Err("zero resize scale".into());
                }
                let h = x[2].checked_mul(scale[0]).ok_or(OVERFLOW)?;
                let w = x[3].checked_mul(scale[1]).ok_or(OVERFLOW)?;
                checked_volume(&[x[0], x[1], h, w])
            }
            Op::MaxPool(p) | Op::AvgPool { pool: p, .. } => {
                arity(1)?;
                rank4(ins[0])?;
                let x = ins[0];
                let h = window_out(x[2], p.kernel[0], p.stride[0], p.pads[0] + p.pads[2], 1)?;
                let w = window_out(x[3], p.kernel[1], p.stride[1], p.pads[1] + p.pads[3], 1)?;
                Ok(vec![x[0], x[1], h, w])
            }
            Op::Pad { pads, .. } => {
                arity(1)?;
                rank4(ins[0])?;
                let x = ins[0];
                let grow = |d: usize, a: usize, b: usize| d.checked_add(a)?.checked_add(b);
                let h = grow(x[2], pads[0], pads[2]).ok_or(OVERFLOW)?;
                let w = grow(x[3], pads[1], pads[3]).ok_or(OVERFLOW)?;
                Ok(vec![x[0], x[1], h, w])
            }
            Op::Reshape { shape } => {
                arity(1)?;
                reshape_target(ins[0], shape)
            }
            Op::Transpose { perm } => {
                arity(1)?;
                let x = ins[0];
                let mut seen = vec![false; x.len()];
                if perm.len() != x.len()
                    || perm
                        .iter()
                        .any(|&p| p >= x.len() || std::mem::replace(&mut seen[p], true))
                {
                    return Err(format!(
                        "perm {perm:?} is not a permutation of rank {}",
                        x.len()
                    ));
                }
                Ok(perm.iter().map(|&p| x[p]).collect())
            }
            Op::Gather {
                axis,
                indices,
                scalar,
            } => {
                arity(1)?;
                let x = ins[0];
                if *axis >= x.len() {
                    return Err(format!("axis {axis} out of range for {x:?}"));
                }
                if indices.iter().any(|&i| i < 0 || i as usize >= x[*axis]) {
                    return Err(format!(
                        "indices {indices:?} out of range for dimension {}",
                        x[*axis]
                    ));
                }
                if *scalar && indices.len() != 1 {
                    return Err("a scalar gather needs exactly one index".into());
                }
                let mut out = x.clone();
                if *scalar {
                    out.remove(*axis);
                } else {
                    out[*axis] = indices.len();
                }
                Ok(out)
            }
            Op::Slice {
                axes,
                starts,
                ends,
                steps,
            } => {
                arity(1)?;
                let mut out = ins[0].clone();
                if axes.len() != starts.len()
                    || axes.len() != ends.len()
                    || axes.len() != steps.len()
                {
                    return Err("axes, starts, ends and steps differ in length".into());
                }
                for k in 0..axes.len() {
                    let a = axes[k];
                    if a >= out.len() || steps[k] <= 0 {
                        return Err(format!(
                            "unsupported slice on axis {a} with step {}",
                            steps[k]
                        ));
                    }
                    let (s, e) = (starts[k], ends[k]);
                    if s < 0 || e < s || e as usize > out[a] {
                        return Err(format!(
                            "slice {s}..{e} out of range for dimension {}",
                            out[a]
                        ));
                    }
                    out[a] = ((e - s) as usize).div_ceil(steps[k] as usize);
                }
                Ok(out)
            }
            Op::Softmax { axis } => {
                arity(1)?;
                if *axis >= ins[0].len() {
                    return Err(format!("axis {axis} out of range for {:?}", ins[0]));
                }
                Ok(ins[0].clone())
            }
        }
    }
}

/// Shapes come from files (`.lbw`, ONNX, darknet `.cfg`): arithmetic on them is checked, so a
/// hostile file is an error rather than an overflow.
const OVERFLOW: &str = "shape arithmetic overflows";

/// Returns the shape if its element count fits in memory terms (`usize` and, as bytes of f32,
/// `isize`).
fn checked_volume(shape: &[usize]) -> std::result::Result<Vec<usize>, String> {
    shape
        .iter()
        .try_fold(4usize, |a, &d| a.checked_mul(d))
        .filter(|&bytes| bytes <= isize::MAX as usize)
        .ok_or_else(|| OVERFLOW.to_string())?;
    Ok(shape.to_vec())
}

/// Output length of a sliding window (conv or pool) along one axis.
pub fn window_out(
    len: usize,
    kernel: usize,
    stride: usize,
    pad_total: usize,
    dilation: usize,
) -> std::result::Result<usize, String> {
    if kernel == 0 || stride == 0 || dilation == 0 {
        return Err("kernel, stride and dilation must be positive".into());
    }
    let span = dilation
        .checked_mul(kernel - 1)
        .and_then(|s| s.checked_add(1))
        .ok_or(OVERFLOW)?;
    let padded = len.checked_add(pad_total).ok_or(OVERFLOW)?;
    if padded < span {
        return Err(format!("window {span} larger than padded input {padded}"));
    }
    Ok((padded - span) / stride + 1)
}

/// Resolves an ONNX reshape target (`0` copies, one `-1` inferred) against an input shape.
pub fn reshape_target(input: &[usize], target: &[i64]) -> std::result::Result<Vec<usize>, String> {
    let total = checked_volume(input)?.iter().product::<usize>();
    let mut out = Vec::with_capacity(target.len());
    let mut infer = None;
    for (i, &d) in target.iter().enumerate() {
        match d {
            0 => out.push(
                *input
                    .get(i)
                    .ok_or("0 in reshape target past the input rank")?,
            ),
            -1 if infer.is_none() => {
                infer = Some(i);
                out.push(1);
            }
            d if d > 0 => out.push(d as usize),
            _ => return Err(format!("invalid reshape target {target:?}")),
        }
    }
    let known = out
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or(OVERFLOW)?;
    if let Some(i) = infer {
        if known == 0 || !total.is_multiple_of(known) {
            return Err(format!("cannot reshape {input:?} to {target:?}"));
        }
        out[i] = total / known;
    }
    if out.iter().product::<usize>() != total {
        return Err(format!(
            "cannot reshape {input:?} ({total} values) to {target:?}"
        ));
    }
    Ok(out)
}

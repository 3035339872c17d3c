//! ONNX import into the internal graph, and export of the internal graph back to ONNX.
//!
//! Import folds every constant operand (reshape targets, gather indices, slice bounds, resize scales,
//! pads) into explicit attributes and BatchNormalization into the preceding conv; an operator the
//! graph has no variant for is refused with its name. Export writes opset 11, which tract runs; that
//! is how the darknet models (and quantized variants) reach the FP32 baseline engine.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use prost::Message;
use tract_onnx::pb::{
    self, AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    TypeProto, ValueInfoProto, attribute_proto::AttributeType, tensor_proto::DataType,
    tensor_shape_proto, type_proto,
};

use crate::error::{Error, Result, read_file};
use crate::model::graph::{Conv, Graph, Node, Op, Pool, Tensor};

/// The operator set the exporter writes (and whose semantics the importer assumes for Softmax).
pub const EXPORT_OPSET: i64 = 11;

/// A constant operand: float tensors become weights, integer ones become attributes.
#[derive(Debug, Clone)]
enum Constant {
    F32(Tensor),
    I64 { shape: Vec<usize>, data: Vec<i64> },
}

impl Constant {
    fn ints(&self) -> Vec<i64> {
        match self {
            Constant::F32(t) => t.data.iter().map(|&v| v as i64).collect(),
            Constant::I64 { data, .. } => data.clone(),
        }
    }
    fn floats(&self) -> Vec<f32> {
        match self {
            Constant::F32(t) => t.data.clone(),
            Constant::I64 { data, .. } => data.iter().map(|&v| v as f32).collect(),
        }
    }
    fn rank(&self) -> usize {
        match self {
            Constant::F32(t) => t.shape.len(),
            Constant::I64 { shape, .. } => shape.len(),
        }
    }
}

fn dims(t: &TensorProto) -> Result<Vec<usize>> {
    t.dims
        .iter()
        .map(|&d| {
            usize::try_from(d)
                .map_err(|_| Error::Model(format!("tensor {:?} has a negative dimension", t.name)))
        })
        .collect()
}

fn element_count(shape: &[usize], name: &str) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::Model(format!("tensor {name:?} is too large")))
}

fn read_constant(t: &TensorProto) -> Result<Constant> {
    let shape = dims(t)?;
    let n = element_count(&shape, &t.name)?;
    let bad = |what: &str| Error::Model(format!("tensor {:?}: {what}", t.name));
    if t.data_location == Some(1) || !t.external_data.is_empty() {
        return Err(bad("external data is not supported"));
    }
    match DataType::try_from(t.data_type) {
        Ok(DataType::Float) => {
            let data: Vec<f32> = if !t.raw_data.is_empty() {
                if t.raw_data.len() != n * 4 {
                    return Err(bad("raw data length does not match its shape"));
                }
                t.raw_data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect()
            } else {
                t.float_data.clone()
            };
            if data.len() != n {
                return Err(bad("value count does not match its shape"));
            }
            Ok(Constant::F32(Tensor { shape, data }))
        }
        Ok(DataType::Int64) | Ok(DataType::Int32) => {
            let width = if t.data_type == DataType::Int64 as i32 {
                8
            } else {
                4
            };
            let data: Vec<i64> = if !t.raw_data.is_empty() {
                if t.raw_data.len() != n * width {
                    return Err(bad("raw data length does not match its shape"));
                }
                if width == 8 {
                    t.raw_data
                        .chunks_exact(8)
                        .map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
                        .collect()
                } else {
                    t.raw_data
                        .chunks_exact(4)
                        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                        .collect()
                }
            } else if width == 8 {
                t.int64_data.clone()
            } else {
                t.int32_data.iter().map(|&v| v as i64).collect()
            };
            if data.len() != n {
                return Err(bad("value count does not match its shape"));
            }
            Ok(Constant::I64 { shape, data })
        }
        _ => Err(bad(&format!("unsupported data type {}", t.data_type))),
    }
}

struct Attrs<'a>(&'a [AttributeProto]);

impl Attrs<'_> {
    fn find(&self, name: &str) -> Option<&AttributeProto> {
        self.0.iter().find(|a| a.name == name)
    }
    fn int(&self, name: &str, default: i64) -> i64 {
        self.find(name).map(|a| a.i).unwrap_or(default)
    }
    fn float(&self, name: &str, default: f32) -> f32 {
        self.find(name).map(|a| a.f).unwrap_or(default)
    }
    fn ints(&self, name: &str) -> Option<Vec<i64>> {
        self.find(name).map(|a| a.ints.clone())
    }
    fn string(&self, name: &str) -> Option<String> {
        self.find(name)
            .map(|a| String::from_utf8_lossy(&a.s).into_owned())
    }
}

fn pair(v: Option<Vec<i64>>, default: usize, what: &str) -> Result<[usize; 2]> {
    match v {
        None => Ok([default, default]),
        Some(v) if v.len() == 2 && v.iter().all(|&x| x >= 0) => Ok([v[0] as usize, v[1] as usize]),
        Some(v) => Err(Error::Model(format!(
            "{what} {v:?} is not a pair of non-negative integers"
        ))),
    }
}

fn quad(v: Option<Vec<i64>>, what: &str) -> Result<[usize; 4]> {
    match v {
        None => Ok([0; 4]),
        Some(v) if v.len() == 4 && v.iter().all(|&x| x >= 0) => {
            Ok([v[0] as usize, v[1] as usize, v[2] as usize, v[3] as usize])
        }
        Some(v) => Err(Error::Model(format!(
            "{what} {v:?} is not four non-negative integers"
        ))),
    }
}

fn normalize_axis(axis: i64, rank: usize) -> Result<usize> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    if a < 0 || a as usize >= rank {
        return Err(Error::Model(format!(
            "axis {axis} out of range for rank {rank}"
        )));
    }
    Ok(a as usize)
}

/// Reads an ONNX file into the internal graph.
pub fn load(path: &Path) -> Result<Graph> {
    let bytes = read_file(path)?;
    let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or("onnx");
    from_bytes(name, &bytes).map_err(|e| match e {
        Error::Model(m) => Error::Model(format!("{}: {m}", path.display())),
        other => other,
    })
}

pub fn from_bytes(name: &str, bytes: &[u8]) -> Result<Graph> {
    let model = ModelProto::decode(bytes)
        .map_err(|e| Error::Model(format!("not a valid ONNX protobuf: {e}")))?;
    let opset = model
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
        .unwrap_or(EXPORT_OPSET);
    let g = model
        .graph
        .as_ref()
        .ok_or_else(|| Error::Model("ONNX model has no graph".into()))?;
    import_graph(name, g, opset)
}

fn import_graph(name: &str, g: &GraphProto, opset: i64) -> Result<Graph> {
    let mut constants: HashMap<String, Constant> = HashMap::new();
    for t in &g.initializer {
        constants.insert(t.name.clone(), read_constant(t)?);
    }
    let inputs: Vec<&ValueInfoProto> = g
        .input
        .iter()
        .filter(|i| !constants.contains_key(&i.name))
        .collect();
    let [input] = inputs.as_slice() else {
        return Err(Error::Model(format!(
            "expected one image input, found {}",
            inputs.len()
        )));
    };
    let input_shape = value_shape(input)?;
    let mut graph = Graph {
        name: name.to_string(),
        input: input.name.clone(),
        input_shape: input_shape.clone(),
        outputs: vec![],
        nodes: vec![],
        weights: BTreeMap::new(),
    };
    let mut shapes: HashMap<String, Vec<usize>> = HashMap::new();
    shapes.insert(input.name.clone(), input_shape);
    // Identity-like nodes are removed; later readers of their output read their input instead.
    let mut alias: HashMap<String, String> = HashMap::new();

    for (idx, n) in g.node.iter().enumerate() {
        let node_name = if n.name.is_empty() {
            format!("{}_{idx}", n.op_type)
        } else {
            n.name.clone()
        };
        let ctx = |e: Error| match e {
            Error::Model(m) => Error::Model(format!("node {node_name:?} ({}): {m}", n.op_type)),
            other => other,
        };
        let a = Attrs(&n.attribute);
        if !n.domain.is_empty() && n.domain != "ai.onnx" {
            return Err(ctx(Error::Model(format!(
                "operator domain {:?} is not supported",
                n.domain
            ))));
        }
        let out = n
            .output
            .first()
            .cloned()
            .ok_or_else(|| ctx(Error::Model("node has no output".into())))?;
        let x = n
            .input
            .first()
            .map(|s| alias.get(s).cloned().unwrap_or_else(|| s.clone()))
            .unwrap_or_default();
        // Nodes that only produce constants or pass their input through leave no node behind.
        match n.op_type.as_str() {
            "Constant" => {
                let t = a
                    .find("value")
                    .and_then(|v| v.t.as_ref())
                    .ok_or_else(|| ctx(Error::Model("Constant without a tensor value".into())))?;
                constants.insert(out, read_constant(t).map_err(ctx)?);
                continue;
            }
            "Identity" | "Dropout" => {
                alias.insert(out, x);
                continue;
            }
            "BatchNormalization" => {
                fold_batchnorm(&mut graph, &x, n, &constants, a.float("epsilon", 1e-5))
                    .map_err(ctx)?;
                alias.insert(out, x);
                continue;
            }
            _ => {}
        }
        let resolve = |s: &String| alias.get(s).cloned().unwrap_or_else(|| s.clone());
        let konst = |i: usize| -> Result<Option<&Constant>> {
            match n.input.get(i) {
                None => Ok(None),
                Some(s) if s.is_empty() => Ok(None),
                Some(s) => constants
                    .get(s)
                    .map(Some)
                    .ok_or_else(|| Error::Model(format!("input {s:?} must be a constant"))),
            }
        };
        let mut ins = vec![x.clone()];
        let op = (|| -> Result<Op> {
            Ok(match n.op_type.as_str() {
                "Conv" => {
                    let w = match konst(1)? {
                        Some(Constant::F32(t)) if t.shape.len() == 4 => t.clone(),
                        _ => return Err(Error::Model("conv weight must be a constant rank-4 float tensor".into())),
                    };
                    if a.string("auto_pad").is_some_and(|p| p != "NOTSET") {
                        return Err(Error::Model("auto_pad is not supported".into()));
                    }
                    let kernel = pair(a.ints("kernel_shape"), 0, "kernel_shape")?;
                    let kernel = if kernel == [0, 0] { [w.shape[2], w.shape[3]] } else { kernel };
                    let wname = format!("{node_name}.weight");
                    let bias = match konst(2)? {
                        Some(Constant::F32(b)) => {
                            let bname = format!("{node_name}.bias");
                            graph.weights.insert(bname.clone(), Tensor::new(vec![b.len()], b.data.clone())?);
                            Some(bname)
                        }
                        Some(_) => return Err(Error::Model("conv bias must be float".into())),
                        None => None,
                    };
                    graph.weights.insert(wname.clone(), w);
                    Op::Conv(Conv {
                        weight: wname,
                        bias,
                        kernel,
                        stride: pair(a.ints("strides"), 1, "strides")?,
                        pads: quad(a.ints("pads"), "pads")?,
                        dilation: pair(a.ints("dilations"), 1, "dilations")?,
                        groups: usize::try_from(a.int("group", 1)).map_err(|_| Error::Model("negative group".into()))?,
                    })
                }
                "Relu" => Op::Relu,
                "LeakyRelu" => Op::LeakyRelu { alpha: a.float("alpha", 0.01) },
                "Sigmoid" => Op::Sigmoid,
                "Mul" | "Add" => {
                    ins = n.input.iter().map(resolve).collect();
                    if ins.len() != 2 || ins.iter().any(|i| constants.contains_key(i)) {
                        return Err(Error::Model("only products and sums of two computed tensors are supported".into()));
                    }
                    if n.op_type == "Mul" { Op::Mul } else { Op::Add }
                }
                "Concat" => {
                    ins = n.input.iter().map(resolve).collect();
                    let rank = shapes.get(&x).map(Vec::len).unwrap_or(0);
                    Op::Concat { axis: normalize_axis(a.int("axis", 0), rank)? }
                }
                "Resize" | "Upsample" => {
                    if a.string("mode").as_deref() != Some("nearest") {
                        return Err(Error::Model("only nearest-neighbour resize is supported".into()));
                    }
                    let ctm = a.string("coordinate_transformation_mode").unwrap_or_else(|| "half_pixel".into());
                    let nearest = a.string("nearest_mode").unwrap_or_else(|| "round_prefer_floor".into());
                    if n.op_type == "Resize" && (ctm != "asymmetric" || nearest != "floor") {
                        return Err(Error::Model(format!(
                            "resize with coordinate_transformation_mode={ctm} nearest_mode={nearest} is not supported"
                        )));
                    }
                    let xs = shapes.get(&x).cloned().unwrap_or_default();
                    let scale_input = if n.op_type == "Upsample" { 1 } else { 2 };
                    let scales = konst(scale_input)?.map(Constant::floats).unwrap_or_default();
                    let scales: Vec<f32> = if scales.is_empty() {
                        let sizes = konst(3)?.map(Constant::ints).unwrap_or_default();
                        if sizes.len() != xs.len() {
                            return Err(Error::Model("resize needs scales or sizes".into()));
                        }
                        sizes.iter().zip(&xs).map(|(&s, &d)| s as f32 / d as f32).collect()
                    } else {
                        scales
                    };
                    if scales.len() != 4 || scales[0] != 1.0 || scales[1] != 1.0 {
                        return Err(Error::Model(format!("resize scales {scales:?} must be [1, 1, sh, sw]")));
                    }
                    let int_scale = |s: f32| -> Result<usize> {
                        if s >= 1.0 && s.fract() == 0.0 {
                            Ok(s as usize)
                        } else {
                            Err(Error::Model(format!("resize scale {s} is not a positive integer")))
                        }
                    };
                    Op::ResizeNearest { scale: [int_scale(scales[2])?, int_scale(scales[3])?] }
                }
                "MaxPool" | "AveragePool" => {
                    if a.int("ceil_mode", 0) != 0 || a.string("auto_pad").is_some_and(|p| p != "NOTSET") {
                        return Err(Error::Model("ceil_mode and auto_pad are not supported".into()));
                    }
                    let pool = Pool {
                        kernel: pair(a.ints("kernel_shape"), 0, "kernel_shape")?,
                        stride: pair(a.ints("strides"), 1, "strides")?,
                        pads: quad(a.ints("pads"), "pads")?,
                    };
                    if n.op_type == "MaxPool" {
                        Op::MaxPool(pool)
                    } else {
                        Op::AvgPool { pool, count_include_pad: a.int("count_include_pad", 0) != 0 }
                    }
                }
                "Pad" => {
                    if a.string("mode").is_some_and(|m| m != "constant") {
                        return Err(Error::Model("only constant padding is supported".into()));
                    }
                    let pads = if opset >= 11 { konst(1)?.map(Constant::ints) } else { a.ints("pads") }
                        .ok_or_else(|| Error::Model("Pad without pads".into()))?;
                    let value = if opset >= 11 {
                        konst(2)?.map(|c| c.floats().first().copied().unwrap_or(0.0)).unwrap_or(0.0)
                    } else {
                        a.float("value", 0.0)
                    };
                    if pads.len() != 8 || pads.iter().any(|&p| p < 0) || pads[0] != 0 || pads[1] != 0 || pads[4] != 0 || pads[5] != 0 {
                        return Err(Error::Model(format!("pads {pads:?}: only non-negative spatial padding of NCHW is supported")));
                    }
                    Op::Pad { pads: [pads[2] as usize, pads[3] as usize, pads[6] as usize, pads[7] as usize], value }
                }
                "Reshape" => Op::Reshape {
                    shape: konst(1)?.map(Constant::ints).ok_or_else(|| Error::Model("Reshape needs a constant shape".into()))?,
                },
                "Transpose" => {
                    let rank = shapes.get(&x).map(Vec::len).unwrap_or(0);
                    let perm = a.ints("perm").unwrap_or_else(|| (0..rank as i64).rev().collect());
                    Op::Transpose { perm: perm.iter().map(|&p| normalize_axis(p, rank)).collect::<Result<_>>()? }
                }
                "Gather" => {
                    let xs = shapes.get(&x).cloned().unwrap_or_default();
                    let axis = normalize_axis(a.int("axis", 0), xs.len())?;
                    let c = konst(1)?.ok_or_else(|| Error::Model("Gather needs constant indices".into()))?;
                    if c.rank() > 1 {
                        return Err(Error::Model("only scalar or 1-D gather indices are supported".into()));
                    }
                    let dim = xs[axis] as i64;
                    let indices = c.ints().into_iter().map(|i| if i < 0 { i + dim } else { i }).collect();
                    Op::Gather { axis, indices, scalar: c.rank() == 0 }
                }
                "Slice" => {
                    let xs = shapes.get(&x).cloned().unwrap_or_default();
                    let (starts, ends, axes, steps) = if opset >= 10 {
                        (konst(1)?.map(Constant::ints), konst(2)?.map(Constant::ints), konst(3)?.map(Constant::ints), konst(4)?.map(Constant::ints))
                    } else {
                        (a.ints("starts"), a.ints("ends"), a.ints("axes"), None)
                    };
                    let starts = starts.ok_or_else(|| Error::Model("Slice needs starts".into()))?;
                    let ends = ends.ok_or_else(|| Error::Model("Slice needs ends".into()))?;
                    let axes = axes.unwrap_or_else(|| (0..starts.len() as i64).collect());
                    let steps = steps.unwrap_or_else(|| vec![1; starts.len()]);
                    if ends.len() != starts.len() || axes.len() != starts.len() || steps.len() != starts.len() {
                        return Err(Error::Model("Slice operands differ in length".into()));
                    }
                    let mut out_axes = vec![];
                    let (mut s_out, mut e_out) = (vec![], vec![]);
                    for k in 0..starts.len() {
                        let ax = normalize_axis(axes[k], xs.len())?;
                        if steps[k] <= 0 {
                            return Err(Error::Model("only positive slice steps are supported".into()));
                        }
                        let d = xs[ax] as i64;
                        let clamp = |v: i64| if v < 0 { (v + d).max(0) } else { v.min(d) };
                        out_axes.push(ax);
                        s_out.push(clamp(starts[k]));
                        e_out.push(clamp(ends[k]).max(clamp(starts[k])));
                    }
                    Op::Slice { axes: out_axes, starts: s_out, ends: e_out, steps }
                }
                "Softmax" => {
                    let rank = shapes.get(&x).map(Vec::len).unwrap_or(0);
                    let axis = normalize_axis(a.int("axis", if opset >= 13 { -1 } else { 1 }), rank)?;
                    // Before opset 13 Softmax flattens from `axis` on; that equals a softmax over one
                    // axis only when it is the last one, so anything else is refused, not misread.
                    if opset < 13 && axis != rank - 1 {
                        return Err(Error::Model("Softmax before opset 13 is only supported on the last axis".into()));
                    }
                    Op::Softmax { axis }
                }
                other => return Err(Error::Model(format!("unsupported ONNX operator {other}"))),
            })
        })()
        .map_err(ctx)?;
        let node = Node {
            name: node_name.clone(),
            op,
            inputs: ins,
            output: out.clone(),
        };
        let in_shapes: Vec<&Vec<usize>> = node
            .inputs
            .iter()
            .map(|i| {
                shapes.get(i).ok_or_else(|| {
                    ctx(Error::Model(format!(
                        "reads {i:?}, which is not computed before it"
                    )))
                })
            })
            .collect::<Result<_>>()?;
        let shape = graph
            .node_output_shape(&node, &in_shapes)
            .map_err(|m| ctx(Error::Model(m)))?;
        shapes.insert(out, shape);
        graph.nodes.push(node);
    }
    graph.outputs = g
        .output
        .iter()
        .map(|o| {
            alias
                .get(&o.name)
                .cloned()
                .unwrap_or_else(|| o.name.clone())
        })
        .collect();
    graph.infer_shapes()?;
    Ok(graph)
}

fn fold_batchnorm(
    graph: &mut Graph,
    x: &str,
    n: &NodeProto,
    constants: &HashMap<String, Constant>,
    eps: f32,
) -> Result<()> {
    let get = |i: usize| -> Result<Vec<f32>> {
        match n.input.get(i).and_then(|s| constants.get(s)) {
            Some(Constant::F32(t)) => Ok(t.data.clone()),
            _ => Err(Error::Model(
                "BatchNormalization parameters must be constant floats".into(),
            )),
        }
    };
    let (gamma, beta, mean, var) = (get(1)?, get(2)?, get(3)?, get(4)?);
    let conv = graph
        .nodes
        .iter_mut()
        .rev()
        .find(|m| m.output == x)
        .and_then(|m| match &mut m.op {
            Op::Conv(c) => Some(c),
            _ => None,
        })
        .ok_or_else(|| {
            Error::Model("BatchNormalization is only supported right after a Conv".into())
        })?
        .clone();
    let w = graph
        .weights
        .get_mut(&conv.weight)
        .ok_or_else(|| Error::Model("conv weight missing".into()))?;
    let c = w.shape[0];
    if [gamma.len(), beta.len(), mean.len(), var.len()]
        .iter()
        .any(|&l| l != c)
    {
        return Err(Error::Model(
            "BatchNormalization size does not match the conv".into(),
        ));
    }
    let per = w.len() / c;
    let scale: Vec<f32> = (0..c).map(|o| gamma[o] / (var[o] + eps).sqrt()).collect();
    for (row, s) in w.data.chunks_mut(per).zip(&scale) {
        row.iter_mut().for_each(|v| *v *= s);
    }
    let old_bias = match &conv.bias {
        Some(b) => graph.weight(b)?.data.clone(),
        None => vec![0.0; c],
    };
    let bias: Vec<f32> = (0..c)
        .map(|o| beta[o] + (old_bias[o] - mean[o]) * scale[o])
        .collect();
    let bname = conv
        .bias
        .clone()
        .unwrap_or_else(|| format!("{}.bias", conv.weight.trim_end_matches(".weight")));
    graph
        .weights
        .insert(bname.clone(), Tensor::new(vec![c], bias)?);
    for m in graph.nodes.iter_mut().rev() {
        if m.output == x
            && let Op::Conv(c) = &mut m.op
        {
            c.bias = Some(bname);
            break;
        }
    }
    Ok(())
}

fn value_shape(v: &ValueInfoProto) -> Result<Vec<usize>> {
    let shape = v
        .r#type
        .as_ref()
        .and_then(|t| t.value.as_ref())
        .and_then(|v| match v {
            type_proto::Value::TensorType(t) => t.shape.as_ref(),
        })
        .ok_or_else(|| Error::Model(format!("input {:?} has no tensor shape", v.name)))?;
    shape
        .dim
        .iter()
        .map(|d| match d.value {
            Some(tensor_shape_proto::dimension::Value::DimValue(x)) if x > 0 => Ok(x as usize),
            _ => Err(Error::Model(format!(
                "input {:?} must have a fixed shape",
                v.name
            ))),
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Export

fn attr_ints(name: &str, v: &[usize]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Ints as i32,
        ints: v.iter().map(|&x| x as i64).collect(),
        ..Default::default()
    }
}

fn attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i: v,
        ..Default::default()
    }
}

fn attr_float(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Float as i32,
        f: v,
        ..Default::default()
    }
}

fn attr_str(name: &str, v: &str) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::String as i32,
        s: v.as_bytes().to_vec(),
        ..Default::default()
    }
}

fn f32_tensor(name: &str, shape: &[usize], data: &[f32]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: shape.iter().map(|&d| d as i64).collect(),
        data_type: DataType::Float as i32,
        raw_data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

fn i64_tensor(name: &str, shape: &[usize], data: &[i64]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: shape.iter().map(|&d| d as i64).collect(),
        data_type: DataType::Int64 as i32,
        raw_data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

fn value_info(name: &str, shape: &[usize]) -> ValueInfoProto {
    let dim = shape
        .iter()
        .map(|&d| pb::tensor_shape_proto::Dimension {
            value: Some(tensor_shape_proto::dimension::Value::DimValue(d as i64)),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: DataType::Float as i32,
                shape: Some(pb::TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Builds an ONNX model (opset 11) equivalent to the graph.
pub fn to_model_proto(graph: &Graph) -> Result<ModelProto> {
    let shapes = graph.infer_shapes()?;
    let mut initializer: Vec<TensorProto> = graph
        .weights
        .iter()
        .map(|(name, t)| f32_tensor(name, &t.shape, &t.data))
        .collect();
    let mut nodes = Vec::with_capacity(graph.nodes.len());
    for n in &graph.nodes {
        let mut inputs = n.inputs.clone();
        let mut attribute = vec![];
        let mut konst = |suffix: &str, t: TensorProto| -> String {
            let name = format!("{}::{suffix}", n.name);
            initializer.push(TensorProto {
                name: name.clone(),
                ..t
            });
            name
        };
        match &n.op {
            Op::Conv(c) => {
                inputs.push(c.weight.clone());
                if let Some(b) = &c.bias {
                    inputs.push(b.clone());
                }
                attribute = vec![
                    attr_ints("kernel_shape", &c.kernel),
                    attr_ints("strides", &c.stride),
                    attr_ints("pads", &c.pads),
                    attr_ints("dilations", &c.dilation),
                    attr_int("group", c.groups as i64),
                ];
            }
            Op::Relu | Op::Sigmoid | Op::Mul | Op::Add => {}
            Op::LeakyRelu { alpha } => attribute.push(attr_float("alpha", *alpha)),
            Op::Concat { axis } | Op::Softmax { axis } => {
                attribute.push(attr_int("axis", *axis as i64))
            }
            Op::ResizeNearest { scale } => {
                inputs.push(konst("roi", f32_tensor("", &[0], &[])));
                inputs.push(konst(
                    "scales",
                    f32_tensor("", &[4], &[1.0, 1.0, scale[0] as f32, scale[1] as f32]),
                ));
                attribute = vec![
                    attr_str("mode", "nearest"),
                    attr_str("coordinate_transformation_mode", "asymmetric"),
                    attr_str("nearest_mode", "floor"),
                ];
            }
            Op::MaxPool(p) | Op::AvgPool { pool: p, .. } => {
                attribute = vec![
                    attr_ints("kernel_shape", &p.kernel),
                    attr_ints("strides", &p.stride),
                    attr_ints("pads", &p.pads),
                ];
                if let Op::AvgPool {
                    count_include_pad, ..
                } = &n.op
                {
                    attribute.push(attr_int("count_include_pad", *count_include_pad as i64));
                }
            }
            Op::Pad { pads, value } => {
                let p = [
                    0,
                    0,
                    pads[0] as i64,
                    pads[1] as i64,
                    0,
                    0,
                    pads[2] as i64,
                    pads[3] as i64,
                ];
                inputs.push(konst("pads", i64_tensor("", &[8], &p)));
                inputs.push(konst("value", f32_tensor("", &[], &[*value])));
                attribute.push(attr_str("mode", "constant"));
            }
            Op::Reshape { shape } => {
                inputs.push(konst("shape", i64_tensor("", &[shape.len()], shape)))
            }
            Op::Transpose { perm } => attribute.push(attr_ints("perm", perm)),
            Op::Gather {
                axis,
                indices,
                scalar,
            } => {
                let shape: &[usize] = if *scalar { &[] } else { &[indices.len()] };
                inputs.push(konst("indices", i64_tensor("", shape, indices)));
                attribute.push(attr_int("axis", *axis as i64));
            }
            Op::Slice {
                axes,
                starts,
                ends,
                steps,
            } => {
                let l = [axes.len()];
                inputs.push(konst("starts", i64_tensor("", &l, starts)));
                inputs.push(konst("ends", i64_tensor("", &l, ends)));
                let axes: Vec<i64> = axes.iter().map(|&a| a as i64).collect();
                inputs.push(konst("axes", i64_tensor("", &l, &axes)));
                inputs.push(konst("steps", i64_tensor("", &l, steps)));
            }
        }
        nodes.push(NodeProto {
            name: n.name.clone(),
            op_type: n.op.onnx_name().into(),
            input: inputs,
            output: vec![n.output.clone()],
            attribute,
            ..Default::default()
        });
    }
    let output = graph
        .outputs
        .iter()
        .map(|o| value_info(o, &shapes[o]))
        .collect();
    Ok(ModelProto {
        ir_version: 6,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: EXPORT_OPSET,
        }],
        producer_name: "lbw".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(GraphProto {
            name: graph.name.clone(),
            node: nodes,
            initializer,
            input: vec![value_info(&graph.input, &graph.input_shape)],
            output,
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// Serialises the graph as an ONNX file's bytes.
pub fn to_onnx_bytes(graph: &Graph) -> Result<Vec<u8>> {
    Ok(to_model_proto(graph)?.encode_to_vec())
}

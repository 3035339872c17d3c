//! A plain f32 interpreter of the internal graph: the numerical reference for every other engine.
//!
//! It is written for clarity, not speed (direct loops, NCHW), and runs every op of [`Op`]. Two
//! options turn it into the tools the integer engine needs:
//! * `record`: keep every intermediate value (calibration observes activation ranges with it);
//! * `fake_quant`: round chosen values to their 8-bit grid as soon as they are computed, which is
//!   the FP32 simulation of what [`crate::engine::shift_add::ShiftAddEngine`] computes in integers.

use std::collections::HashMap;

use crate::engine::Backend;
use crate::engine::quant_params::QParams;
use crate::error::{Error, Result};
use crate::model::graph::reshape_target;
use crate::model::{Conv, Graph, Node, Op, Pool, Tensor};

/// Runs a graph in f32.
#[derive(Debug, Clone)]
pub struct ReferenceInterpreter {
    graph: Graph,
    shapes: HashMap<String, Vec<usize>>,
    fake_quant: HashMap<String, QParams>,
}

/// Every value computed by one run, by name (the input included).
pub type Recording = HashMap<String, Tensor>;

impl ReferenceInterpreter {
    pub fn new(graph: &Graph) -> Result<Self> {
        let shapes = graph.infer_shapes()?;
        Ok(ReferenceInterpreter {
            graph: graph.clone(),
            shapes,
            fake_quant: HashMap::new(),
        })
    }

    /// Rounds each named value (the graph input included) to its 8-bit grid when it is produced.
    /// Names that the graph does not compute are an error, so a stale scale map cannot be ignored.
    pub fn with_fake_quant(mut self, params: HashMap<String, QParams>) -> Result<Self> {
        if let Some(name) = params.keys().find(|n| !self.shapes.contains_key(*n)) {
            return Err(Error::Model(format!(
                "activation scale for {name:?}, which {} does not compute",
                self.graph.name
            )));
        }
        self.fake_quant = params;
        Ok(self)
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    pub fn shapes(&self) -> &HashMap<String, Vec<usize>> {
        &self.shapes
    }

    /// Runs one input; returns the graph outputs and, when `record`, every value.
    pub fn run_recording(&self, input: Tensor, record: bool) -> Result<(Vec<Tensor>, Recording)> {
        let mut rec = Recording::new();
        let outputs = if record {
            self.run_observed(input, &mut |name, t| {
                rec.insert(name.to_string(), t.clone());
            })?
        } else {
            self.run_observed(input, &mut |_, _| {})?
        };
        Ok((outputs, rec))
    }

    /// Runs one input, showing every value (after fake quantization) to `observe` as it is made.
    pub fn run_observed(
        &self,
        input: Tensor,
        observe: &mut dyn FnMut(&str, &Tensor),
    ) -> Result<Vec<Tensor>> {
        if input.shape != self.graph.input_shape {
            return Err(Error::Inference(format!(
                "input shape {:?}, expected {:?}",
                input.shape, self.graph.input_shape
            )));
        }
        // Values are dropped after their last use.
        let mut last_use: HashMap<&str, usize> = HashMap::new();
        for (i, n) in self.graph.nodes.iter().enumerate() {
            for v in &n.inputs {
                last_use.insert(v.as_str(), i);
            }
        }
        let mut values: HashMap<String, Tensor> = HashMap::new();
        let mut input = input;
        self.maybe_fake_quant(&self.graph.input, &mut input);
        observe(&self.graph.input, &input);
        values.insert(self.graph.input.clone(), input);
        for (i, node) in self.graph.nodes.iter().enumerate() {
            let ins: Vec<&Tensor> = node.inputs.iter().map(|n| &values[n]).collect();
            let mut out = eval_node(&self.graph, node, &ins).map_err(|e| {
                Error::Inference(format!("node {} ({}): {e}", node.name, node.op.onnx_name()))
            })?;
            debug_assert_eq!(out.shape, self.shapes[&node.output], "{}", node.name);
            self.maybe_fake_quant(&node.output, &mut out);
            observe(&node.output, &out);
            values.insert(node.output.clone(), out);
            for v in &node.inputs {
                if last_use.get(v.as_str()) == Some(&i) && !self.graph.outputs.contains(v) {
                    values.remove(v);
                }
            }
        }
        Ok(self
            .graph
            .outputs
            .iter()
            .map(|o| values[o].clone())
            .collect())
    }

    fn maybe_fake_quant(&self, name: &str, t: &mut Tensor) {
        if let Some(p) = self.fake_quant.get(name) {
            for x in &mut t.data {
                *x = p.fake_quant(*x);
            }
        }
    }
}

impl Backend for ReferenceInterpreter {
    fn engine(&self) -> &'static str {
        if self.fake_quant.is_empty() {
            "reference"
        } else {
            "reference-fake-quant"
        }
    }

    fn kernel(&self) -> &str {
        "reference-f32"
    }

    fn run(&self, input: Tensor) -> Result<Vec<Tensor>> {
        Ok(self.run_recording(input, false)?.0)
    }

    fn weight_bytes(&self) -> usize {
        self.graph.parameter_count() * 4
    }
}

type OpResult = std::result::Result<Tensor, String>;

/// Evaluates one node on f32 inputs. Public so the integer engine can run non-conv ops this way.
pub fn eval_node(graph: &Graph, node: &Node, ins: &[&Tensor]) -> OpResult {
    let shapes: Vec<&Vec<usize>> = ins.iter().map(|t| &t.shape).collect();
    let out_shape = graph.node_output_shape(node, &shapes)?;
    let t = match &node.op {
        Op::Conv(c) => {
            let w = graph.weight(&c.weight).map_err(|e| e.to_string())?;
            let b = match &c.bias {
                Some(b) => Some(graph.weight(b).map_err(|e| e.to_string())?),
                None => None,
            };
            conv2d(ins[0], w, b.map(|b| b.data.as_slice()), c, &out_shape)
        }
        Op::Relu => map(ins[0], |x| x.max(0.0)),
        Op::LeakyRelu { alpha } => map(ins[0], |x| if x < 0.0 { alpha * x } else { x }),
        Op::Sigmoid => map(ins[0], sigmoid),
        Op::Mul => zip(ins[0], ins[1], |a, b| a * b),
        Op::Add => zip(ins[0], ins[1], |a, b| a + b),
        Op::Concat { axis } => concat(ins, *axis, &out_shape),
        Op::ResizeNearest { scale } => resize_nearest(ins[0], *scale, &out_shape),
        Op::MaxPool(p) => pool(ins[0], p, &out_shape, PoolKind::Max),
        Op::AvgPool {
            pool: p,
            count_include_pad,
        } => pool(ins[0], p, &out_shape, PoolKind::Avg(*count_include_pad)),
        Op::Pad { pads, value } => pad(ins[0], *pads, *value, &out_shape),
        Op::Reshape { shape } => {
            let s = reshape_target(&ins[0].shape, shape)?;
            Tensor {
                shape: s,
                data: ins[0].data.clone(),
            }
        }
        Op::Transpose { perm } => transpose(ins[0], perm, &out_shape),
        Op::Gather {
            axis,
            indices,
            scalar: _,
        } => {
            let idx: Vec<usize> = indices.iter().map(|&i| i as usize).collect();
            select_along(ins[0], *axis, &idx, out_shape)
        }
        Op::Slice {
            axes,
            starts,
            ends: _,
            steps,
        } => slice(ins[0], axes, starts, steps, out_shape),
        Op::Softmax { axis } => softmax(ins[0], *axis),
    };
    Ok(t)
}

pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

fn map(x: &Tensor, f: impl Fn(f32) -> f32) -> Tensor {
    Tensor {
        shape: x.shape.clone(),
        data: x.data.iter().map(|&v| f(v)).collect(),
    }
}

fn zip(a: &Tensor, b: &Tensor, f: impl Fn(f32, f32) -> f32) -> Tensor {
    Tensor {
        shape: a.shape.clone(),
        data: a.data.iter().zip(&b.data).map(|(&x, &y)| f(x, y)).collect(),
    }
}

/// Direct convolution, NCHW, accumulating in f32 in (ic, ky, kx) order.
pub fn conv2d(x: &Tensor, w: &Tensor, bias: Option<&[f32]>, c: &Conv, out: &[usize]) -> Tensor {
    let (n, cin, h, wd) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3]);
    let (cout, oh, ow) = (out[1], out[2], out[3]);
    let cin_g = cin / c.groups;
    let cout_g = cout / c.groups;
    let [kh, kw] = c.kernel;
    let [sy, sx] = c.stride;
    let [dy, dx] = c.dilation;
    let (pt, pl) = (c.pads[0] as isize, c.pads[1] as isize);
    let mut y = vec![0f32; n * cout * oh * ow];
    for b in 0..n {
        for oc in 0..cout {
            let g = oc / cout_g;
            let plane = &mut y[(b * cout + oc) * oh * ow..][..oh * ow];
            plane.fill(bias.map_or(0.0, |b| b[oc]));
            for icg in 0..cin_g {
                let ic = g * cin_g + icg;
                let xin = &x.data[(b * cin + ic) * h * wd..][..h * wd];
                for ky in 0..kh {
                    for kx in 0..kw {
                        let wv = w.data[((oc * cin_g + icg) * kh + ky) * kw + kx];
                        if wv == 0.0 {
                            continue;
                        }
                        for oy in 0..oh {
                            let iy = (oy * sy + ky * dy) as isize - pt;
                            if iy < 0 || iy >= h as isize {
                                continue;
                            }
                            let row = &xin[iy as usize * wd..][..wd];
                            let orow = &mut plane[oy * ow..][..ow];
                            let x0 = (kx * dx) as isize - pl;
                            for (ox, o) in orow.iter_mut().enumerate() {
                                let ix = (ox * sx) as isize + x0;
                                if ix >= 0 && ix < wd as isize {
                                    *o += wv * row[ix as usize];
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    Tensor {
        shape: out.to_vec(),
        data: y,
    }
}

fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

fn concat(ins: &[&Tensor], axis: usize, out: &[usize]) -> Tensor {
    let outer: usize = out[..axis].iter().product();
    let inner: usize = out[axis + 1..].iter().product();
    let mut data = Vec::with_capacity(out.iter().product());
    for o in 0..outer {
        for t in ins {
            let chunk = t.shape[axis] * inner;
            data.extend_from_slice(&t.data[o * chunk..][..chunk]);
        }
    }
    Tensor {
        shape: out.to_vec(),
        data,
    }
}

fn resize_nearest(x: &Tensor, scale: [usize; 2], out: &[usize]) -> Tensor {
    let (h, w) = (x.shape[2], x.shape[3]);
    let (oh, ow) = (out[2], out[3]);
    let planes = out[0] * out[1];
    let mut data = Vec::with_capacity(planes * oh * ow);
    for p in 0..planes {
        let src = &x.data[p * h * w..][..h * w];
        for oy in 0..oh {
            let row = &src[(oy / scale[0]) * w..][..w];
            data.extend((0..ow).map(|ox| row[ox / scale[1]]));
        }
    }
    Tensor {
        shape: out.to_vec(),
        data,
    }
}

#[derive(Clone, Copy)]
enum PoolKind {
    Max,
    Avg(bool),
}

fn pool(x: &Tensor, p: &Pool, out: &[usize], kind: PoolKind) -> Tensor {
    let (h, w) = (x.shape[2], x.shape[3]);
    let (oh, ow) = (out[2], out[3]);
    let planes = out[0] * out[1];
    let mut data = Vec::with_capacity(planes * oh * ow);
    for pl in 0..planes {
        let src = &x.data[pl * h * w..][..h * w];
        for oy in 0..oh {
            for ox in 0..ow {
                let y0 = (oy * p.stride[0]) as isize - p.pads[0] as isize;
                let x0 = (ox * p.stride[1]) as isize - p.pads[1] as isize;
                let (mut acc, mut n) = match kind {
                    PoolKind::Max => (f32::NEG_INFINITY, 0usize),
                    PoolKind::Avg(_) => (0.0, 0),
                };
                for ky in 0..p.kernel[0] as isize {
                    for kx in 0..p.kernel[1] as isize {
                        let (iy, ix) = (y0 + ky, x0 + kx);
                        if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                            continue;
                        }
                        let v = src[iy as usize * w + ix as usize];
                        match kind {
                            PoolKind::Max => acc = acc.max(v),
                            PoolKind::Avg(_) => acc += v,
                        }
                        n += 1;
                    }
                }
                data.push(match kind {
                    PoolKind::Max => acc,
                    PoolKind::Avg(true) => acc / (p.kernel[0] * p.kernel[1]) as f32,
                    PoolKind::Avg(false) => acc / n.max(1) as f32,
                });
            }
        }
    }
    Tensor {
        shape: out.to_vec(),
        data,
    }
}

fn pad(x: &Tensor, pads: [usize; 4], value: f32, out: &[usize]) -> Tensor {
    let (h, w) = (x.shape[2], x.shape[3]);
    let (oh, ow) = (out[2], out[3]);
    let planes = out[0] * out[1];
    let mut data = vec![value; planes * oh * ow];
    for p in 0..planes {
        for y in 0..h {
            let dst = (p * oh + y + pads[0]) * ow + pads[1];
            data[dst..dst + w].copy_from_slice(&x.data[(p * h + y) * w..][..w]);
        }
    }
    Tensor {
        shape: out.to_vec(),
        data,
    }
}

fn transpose(x: &Tensor, perm: &[usize], out: &[usize]) -> Tensor {
    let in_strides = strides(&x.shape);
    // Stride in the input of each output axis.
    let src: Vec<usize> = perm.iter().map(|&p| in_strides[p]).collect();
    let total: usize = out.iter().product();
    let mut data = Vec::with_capacity(total);
    let mut idx = vec![0usize; out.len()];
    let mut off = 0usize;
    for _ in 0..total {
        data.push(x.data[off]);
        for a in (0..out.len()).rev() {
            idx[a] += 1;
            off += src[a];
            if idx[a] < out[a] {
                break;
            }
            off -= src[a] * out[a];
            idx[a] = 0;
        }
    }
    Tensor {
        shape: out.to_vec(),
        data,
    }
}

/// Picks `indices` along `axis` (Gather; also Slice, whose indices are a strided range).
fn select_along(x: &Tensor, axis: usize, indices: &[usize], out: Vec<usize>) -> Tensor {
    let outer: usize = x.shape[..axis].iter().product();
    let inner: usize = x.shape[axis + 1..].iter().product();
    let dim = x.shape[axis];
    let mut data = Vec::with_capacity(outer * indices.len() * inner);
    for o in 0..outer {
        for &i in indices {
            data.extend_from_slice(&x.data[(o * dim + i) * inner..][..inner]);
        }
    }
    Tensor { shape: out, data }
}

fn slice(x: &Tensor, axes: &[usize], starts: &[i64], steps: &[i64], out: Vec<usize>) -> Tensor {
    let mut t = x.clone();
    for (k, &a) in axes.iter().enumerate() {
        let n = out[a];
        let idx: Vec<usize> = (0..n)
            .map(|i| (starts[k] + i as i64 * steps[k]) as usize)
            .collect();
        let mut s = t.shape.clone();
        s[a] = n;
        t = select_along(&t, a, &idx, s);
    }
    t
}

fn softmax(x: &Tensor, axis: usize) -> Tensor {
    let dim = x.shape[axis];
    let inner: usize = x.shape[axis + 1..].iter().product();
    let outer: usize = x.shape[..axis].iter().product();
    let mut data = x.data.clone();
    for o in 0..outer {
        for i in 0..inner {
            let at = |k: usize| (o * dim + k) * inner + i;
            let m = (0..dim)
                .map(|k| data[at(k)])
                .fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0;
            for k in 0..dim {
                let e = (data[at(k)] - m).exp();
                data[at(k)] = e;
                sum += e;
            }
            for k in 0..dim {
                data[at(k)] /= sum;
            }
        }
    }
    Tensor {
        shape: x.shape.clone(),
        data,
    }
}
